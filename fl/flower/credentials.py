"""Throwaway TLS certificates and SuperNode keys for a federation on one machine.

A real deployment uses the hospitals' own PKI (docs/deployment.md says how);
this module makes what a local run needs, with the `cryptography` package:

- a certificate authority (`ca.crt`), valid for a few days; its private key
  signs the server certificate in memory and is never written to disk, so no
  process (and no site's code) can sign another certificate with it;
- the SuperLink's server certificate (`superlink.crt`, `superlink.key`),
  signed by that CA, for 127.0.0.1 and localhost;
- one ECDSA P-384 key pair per hospital (`<site>.key`, `<site>.pub`, OpenSSH
  format, as `flower-supernode --auth-supernode-private-key` and
  `flwr supernode register` expect). Only registered public keys may join.

Certificates are made again when they have expired (or expire within a
day), or when the server certificate does not name the hosts asked for.
`python -m fl.flower.credentials FOLDER SITE [SITE ...]` writes them.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOCAL_HOSTS = ("127.0.0.1", "localhost")
VALID_DAYS = 7


@dataclass(frozen=True)
class Credentials:
    """Paths of the files one local federation needs."""

    folder: Path
    sites: tuple[str, ...]

    @property
    def ca_certificate(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def server_certificate(self) -> Path:
        return self.folder / "superlink.crt"

    @property
    def server_key(self) -> Path:
        return self.folder / "superlink.key"

    def node_private_key(self, site: str) -> Path:
        return self.folder / f"{site}.key"

    def node_public_key(self, site: str) -> Path:
        return self.folder / f"{site}.pub"


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FedHF compendium (local test only)"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_certificates(folder: Path, hosts: tuple[str, ...] = LOCAL_HOSTS, now: datetime | None = None) -> None:
    """Write a CA and a SuperLink certificate for `hosts`, signed by it, into `folder`."""
    now = now or datetime.now(timezone.utc)
    start, end = now - timedelta(minutes=5), now + timedelta(days=VALID_DAYS)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (x509.CertificateBuilder().subject_name(_name("FedHF local CA")).issuer_name(_name("FedHF local CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA384()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    names = [x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h) for h in hosts]
    server_cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
                   .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .sign(ca_key, hashes.SHA384()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (folder / "ca.key").unlink(missing_ok=True)  # (written by earlier versions) the CA key is never kept
    (folder / "superlink.crt").write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(folder / "superlink.key", _pem_key(server_key))


def make_node_key(private_path: Path, public_path: Path) -> None:
    """Write an ECDSA P-384 key pair in OpenSSH format (the SuperNode's identity)."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(private_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption()))
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                          serialization.PublicFormat.OpenSSH) + b"\n")


def certificates_usable(credentials: Credentials, hosts: tuple[str, ...] = LOCAL_HOSTS,
                        now: datetime | None = None) -> str | None:
    """Return why the certificates in `credentials` must be made again (None: they can be reused)."""
    paths = (credentials.ca_certificate, credentials.server_certificate, credentials.server_key)
    if not all(path.exists() for path in paths):
        return "missing"
    now = now or datetime.now(timezone.utc)
    try:
        ca = x509.load_pem_x509_certificate(credentials.ca_certificate.read_bytes())
        server = x509.load_pem_x509_certificate(credentials.server_certificate.read_bytes())
        server.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return "unreadable, or not signed by the CA"
    for name, certificate in (("CA", ca), ("server", server)):
        if certificate.not_valid_after_utc < now + timedelta(days=1):
            return f"{name} certificate expires {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    named = {str(v) for v in names.get_values_for_type(x509.IPAddress)} | set(names.get_values_for_type(x509.DNSName))
    if named != set(hosts):
        return f"server certificate names {sorted(named)}, not {sorted(hosts)}"
    return None


def make_credentials(folder: Path, sites: tuple[str, ...] | list[str], hosts: tuple[str, ...] = LOCAL_HOSTS,
                     now: datetime | None = None) -> Credentials:
    """Return the credentials in `folder`, creating whatever is missing, expired or misnamed."""
    credentials = Credentials(Path(folder), tuple(sites))
    if certificates_usable(credentials, hosts, now) is not None:
        make_certificates(credentials.folder, hosts, now)
    for site in credentials.sites:
        if not (credentials.node_private_key(site).exists() and credentials.node_public_key(site).exists()):
            make_node_key(credentials.node_private_key(site), credentials.node_public_key(site))
    return credentials


#: File openings that must never be published: PEM/OpenSSH private keys, and SQLite databases
#: (the SuperLink's state holds node keys and run records).
SECRET_MARKERS = (b"PRIVATE KEY-----", b"SQLite format 3\x00")


def secrets_in(folder: Path) -> list[Path]:
    """Return the files under `folder` that hold a private key or a database (nothing here may be published)."""
    found = []
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                head = handle.read(1 << 16)
            if head.startswith(SECRET_MARKERS[1]) or SECRET_MARKERS[0] in head or path.suffix in (".key", ".db"):
                found.append(path)
    return found


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fl.flower.credentials",
                                     description="Write a throwaway CA, SuperLink certificate and SuperNode keys.")
    parser.add_argument("folder", type=Path)
    parser.add_argument("sites", nargs="+", help="one key pair per site")
    args = parser.parse_args(argv)
    credentials = make_credentials(args.folder, args.sites)
    print(f"credentials for {', '.join(credentials.sites)} in {credentials.folder}")


if __name__ == "__main__":
    main()
