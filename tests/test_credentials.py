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


def test_private_files_are_readable_by_their_owner_only_and_the_ca_key_is_never_kept(tmp_path):
    c = make_credentials(tmp_path, ["halland"])
    for path in (c.server_key, c.node_private_key("halland")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert not (tmp_path / "ca.key").exists()
    assert b"PRIVATE KEY" not in b"".join(p.read_bytes() for p in tmp_path.glob("*.crt"))


def test_certificates_are_made_again_when_expired_or_naming_other_hosts(tmp_path):
    from datetime import datetime, timedelta, timezone

    from fl.flower.credentials import VALID_DAYS, certificates_usable

    first = make_credentials(tmp_path, ["halland"])
    ca = first.ca_certificate.read_bytes()
    assert certificates_usable(first) is None
    assert make_credentials(tmp_path, ["halland"]).ca_certificate.read_bytes() == ca  # reused while valid
    later = datetime.now(timezone.utc) + timedelta(days=VALID_DAYS)
    assert "expires" in certificates_usable(first, now=later)
    again = make_credentials(tmp_path, ["halland"], now=later)
    assert again.ca_certificate.read_bytes() != ca and certificates_usable(again, now=later) is None
    renamed = make_credentials(tmp_path, ["halland"], hosts=("127.0.0.1", "aggregator.example.se"), now=later)
    assert certificates_usable(renamed, now=later) is not None  # not for the local hosts any more
    assert certificates_usable(renamed, hosts=("127.0.0.1", "aggregator.example.se"), now=later) is None


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


def test_the_publish_scan_finds_private_keys_and_databases(tmp_path):
    import sqlite3

    from fl.flower.credentials import secrets_in

    c = make_credentials(tmp_path / "credentials", ["halland"])
    published = tmp_path / "published"
    (published / "logs").mkdir(parents=True)
    (published / "ca.crt").write_bytes(c.ca_certificate.read_bytes())
    (published / "logs" / "run.log").write_text("a log line\n")
    assert secrets_in(published) == []
    # Planted: a node key under an innocent name, and a SQLite database.
    (published / "logs" / "notes.txt").write_bytes(c.node_private_key("halland").read_bytes())
    sqlite3.connect(published / "state.bin").execute("create table t (x)").connection.commit()
    assert sorted(p.name for p in secrets_in(published)) == ["notes.txt", "state.bin"]
