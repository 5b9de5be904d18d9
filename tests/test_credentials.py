"""Throwaway TLS certificates and SuperNode keys: valid chain, right names, private files, Flower-readable keys."""
from __future__ import annotations

import ipaddress
import stat

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fl.flower.credentials import make_credentials


def test_the_superlink_certificate_is_signed_by_the_ca_for_the_local_hosts(tmp_path):
    c = make_credentials(tmp_path, ["halland", "sahlgrenska"])
    ca = x509.load_pem_x509_certificate(c.ca_certificate.read_bytes())
    server = x509.load_pem_x509_certificate(c.server_certificate.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer does not match
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_private_files_are_readable_by_their_owner_only(tmp_path):
    c = make_credentials(tmp_path, ["halland"])
    for path in (c.server_key, tmp_path / "ca.key", c.node_private_key("halland")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_node_keys_are_p384_openssh_pairs_as_flower_loads_them(tmp_path):
    c = make_credentials(tmp_path, ["halland", "sahlgrenska"])
    private = load_ssh_private_key(c.node_private_key("halland").read_bytes(), password=None)
    public = load_ssh_public_key(c.node_public_key("halland").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
    assert private.public_key().public_numbers() == public.public_numbers()
    other = load_ssh_public_key(c.node_public_key("sahlgrenska").read_bytes())
    assert other.public_numbers() != public.public_numbers()


def test_existing_credentials_are_kept(tmp_path):
    first = make_credentials(tmp_path, ["halland"])
    before = first.node_private_key("halland").read_bytes(), first.ca_certificate.read_bytes()
    again = make_credentials(tmp_path, ["halland", "sahlgrenska"])
    assert (again.node_private_key("halland").read_bytes(), again.ca_certificate.read_bytes()) == before
    assert again.node_private_key("sahlgrenska").exists()
