"""`fraudscore keys | audit | alerts`: key directories, audit verification, analyst access.

Argument parsing and messages only; the work is in app.security, app.audit and
app.audit_kafka. Exit codes: 0 done, 1 failed (broken chain, decryption failed), 2 bad
usage or configuration, 3 refused (no key), 4 not found.
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from app.config import ConfigError, Settings, load_settings

console = Console(stderr=True)
keys_app = typer.Typer(no_args_is_help=True, help="Key directories: generate, rotate, list.")
audit_app = typer.Typer(no_args_is_help=True, help="Audit trail: verify hash chains.")
alerts_app = typer.Typer(no_args_is_help=True,
                         help="Alerts: show one, or decrypt its personal data (audited).")

EXIT_FAILED, EXIT_USAGE, EXIT_REFUSED, EXIT_NOT_FOUND = 1, 2, 3, 4


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(EXIT_USAGE) from None


def _fail(message: str, code: int) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


# ---- keys ---------------------------------------------------------------------------------

DirOption = Annotated[Path | None, typer.Option(
    "--dir", help="key directory (default: FRAUDSCORE_PII_KEYRING_DIR)")]
MasterOption = Annotated[Path | None, typer.Option(
    "--master-key-file", help="wrap data keys with this local master key (envelope mode; "
                              "default: FRAUDSCORE_MASTER_KEY_FILE / FRAUDSCORE_KEY_WRAPPER)")]


def _key_dir(directory: Path | None, settings: Settings) -> Path:
    chosen = directory or settings.pii_keyring_dir
    if chosen is None:
        raise _fail("give --dir DIR or set FRAUDSCORE_PII_KEYRING_DIR", EXIT_USAGE)
    return chosen


def _wrapper(settings: Settings, master: Path | None) -> Any:
    from app.security.keyring import LocalFileKeyWrapper
    from app.security.keys import key_wrapper
    from app.security.tokens import KeyMaterialError

    try:
        return LocalFileKeyWrapper.from_file(master) if master else key_wrapper(settings)
    except (KeyMaterialError, ConfigError) as exc:
        raise _fail(str(exc), EXIT_USAGE) from None


@keys_app.command("generate")
def keys_generate(directory: DirOption = None, master_key_file: MasterOption = None) -> None:
    """Create a key directory (mode 700) with one active AES-256 key (file mode 600)."""
    from app.security.keyring import generate
    from app.security.tokens import KeyMaterialError

    settings = _settings()
    path = _key_dir(directory, settings)
    try:
        kid = generate(path, _wrapper(settings, master_key_file))
    except KeyMaterialError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    console.print(f"generated key {kid} (active) in {path}")


@keys_app.command("rotate")
def keys_rotate(directory: DirOption = None, master_key_file: MasterOption = None) -> None:
    """Add a new active key; older keys stay for decryption. Running scorers switch to it
    before their next batch (they watch the ACTIVE file), without a restart."""
    from app.security.keyring import rotate
    from app.security.tokens import KeyMaterialError

    settings = _settings()
    path = _key_dir(directory, settings)
    try:
        kid = rotate(path, _wrapper(settings, master_key_file))
    except KeyMaterialError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    console.print(f"rotated: {kid} is now the active key in {path}")


@keys_app.command("list")
def keys_list(directory: DirOption = None) -> None:
    """Key ids, creation dates, wrapping and file modes; never key material."""
    from app.security.keyring import list_keys

    settings = _settings()
    path = _key_dir(directory, settings)
    if not path.is_dir():
        raise _fail(f"{path} is not a directory", EXIT_NOT_FOUND)
    table = Table("kid", "created", "wrapped by", "mode", "active")
    for info in list_keys(path):
        table.add_row(info.kid, info.created_at, info.wrapper or "-", info.mode,
                      "yes" if info.active else "")
    Console().print(table)


@keys_app.command("new-master")
def keys_new_master(path: Path) -> None:
    """Write a new local master key (32 random bytes, base64, mode 600) for envelope mode."""
    import base64
    import os

    if path.exists():
        raise _fail(f"{path} exists; refusing to overwrite a master key", EXIT_USAGE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(base64.b64encode(os.urandom(32)).decode() + "\n")
    console.print(f"wrote master key {path} (mode 600); keep a copy offline")


# ---- audit --------------------------------------------------------------------------------


@audit_app.command("verify")
def audit_verify(
    topic: Annotated[str | None, typer.Option(help="audit topic to read (read_committed)")]
    = None,
    file: Annotated[Path | None, typer.Option(help="audit file (JSON lines)")] = None,
    anchor: Annotated[list[Path] | None, typer.Option(
        help="checkpoints: a copy of the records or the scorer's logs (repeatable)")] = None,
    allow_truncated_start: Annotated[bool, typer.Option(
        help="accept chains whose first records expired (topic retention)")] = False,
) -> None:
    """Check every writer's chain; report the first broken link (exit 1 when any)."""
    from app.audit import file_records, verify
    from app.security.keys import audit_signer

    if (topic is None) == (file is None):
        raise _fail("give exactly one of --topic T or --file F", EXIT_USAGE)
    settings = _settings()
    try:
        signer = audit_signer(settings)
    except ConfigError as exc:
        raise _fail(str(exc), EXIT_REFUSED) from None
    if file is not None:
        if not file.exists():
            raise _fail(f"{file}: no such file", EXIT_NOT_FOUND)
        records: Any = file_records(file)
    else:
        from app.audit_kafka import topic_records

        records = topic_records(settings.kafka_client_config(), str(topic))
    anchors = [r for path in (anchor or []) for r in file_records(path)]
    report = verify(records, signer, anchors, allow_truncated_start)
    for chain in report.chains.values():
        status = "ok" if chain.ok else "[red]BROKEN[/red]"
        console.print(f"{chain.writer_id}: {chain.records} records, seq {chain.first_seq}"
                      f"..{chain.last_seq}: {status}")
        for note in chain.notes:
            console.print(f"  note: {note}")
        if chain.problems:
            console.print(f"  first broken link: {chain.problems[0]}")
            if len(chain.problems) > 1:
                console.print(f"  ({len(chain.problems) - 1} more problems)")
    for problem in report.problems[:10]:
        console.print(f"[red]{problem}[/red]")
    if not report.chains and not report.problems:
        console.print("no audit records found")
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)
    console.print("audit trail verified")


# ---- alerts -------------------------------------------------------------------------------

SourceTopic = Annotated[str | None, typer.Option(
    "--from-topic", help="read the alert from this topic (default: FRAUDSCORE_TOPIC_ALERTS)")]
SourceFile = Annotated[Path | None, typer.Option(
    "--file", help="read the alert from an alerts JSONL file instead of Kafka")]


def _alerts_in(settings: Settings, topic: str | None, file: Path | None
               ) -> Iterator[tuple[str, bytes]]:
    if file is not None:
        from app.audit import file_records

        if not file.exists():
            raise _fail(f"{file}: no such file", EXIT_NOT_FOUND)
        return file_records(file)
    from app.audit_kafka import topic_records

    return topic_records(settings.kafka_client_config(), topic or settings.topic_alerts)


def _find_alert(settings: Settings, alert_id: str, topic: str | None, file: Path | None
                ) -> Any:
    from app.schemas import Alert

    needle = f'"alert_id":"{alert_id}"'.encode()
    for _, raw in _alerts_in(settings, topic, file):
        if needle in raw.replace(b'": "', b'":"'):
            return Alert.model_validate_json(raw)
    raise _fail(f"alert {alert_id} not found in "
                f"{file or topic or settings.topic_alerts}", EXIT_NOT_FOUND)


def _summary(alert: Any) -> dict[str, Any]:
    doc: dict[str, Any] = alert.model_dump(mode="json", exclude={"pii"})
    return doc


@alerts_app.command("show")
def alerts_show(alert_id: str, from_topic: SourceTopic = None, file: SourceFile = None) -> None:
    """The alert without its personal data (which stays encrypted; no key needed)."""
    settings = _settings()
    alert = _find_alert(settings, alert_id, from_topic, file)
    doc = _summary(alert)
    doc["pii"] = f"encrypted (AES-256-GCM, key {alert.pii.kid}); use `fraudscore alerts decrypt`"
    print(json.dumps(doc, indent=2))


@alerts_app.command("decrypt")
def alerts_decrypt(
    alert_id: str,
    reason: Annotated[str, typer.Option(help="why you need the personal data (audited)")],
    from_topic: SourceTopic = None,
    file: SourceFile = None,
    analyst: Annotated[str | None, typer.Option(
        help="who you are, if not your OS user (both are recorded)")] = None,
    audit_file: Annotated[Path | None, typer.Option(
        help="write the audit record to this file instead of the audit topic")] = None,
) -> None:
    """Decrypt an alert's personal data. Every attempt is audited first; nothing is shown
    unless its audit record was written."""
    from app.audit_kafka import record_access
    from app.security.envelope import DecryptionError, FieldCipher, associated_data
    from app.security.keys import audit_signer, has_pii_key, pii_keyring

    if len(reason.strip()) < 5:
        raise _fail("--reason must say why (at least 5 characters)", EXIT_USAGE)
    settings = _settings()
    if not has_pii_key(settings):
        raise _fail("no decryption key: set FRAUDSCORE_PII_KEYRING_DIR (or FRAUDSCORE_PII_KEY"
                    "/_FILE); nothing was decrypted", EXIT_REFUSED)
    try:
        cipher = FieldCipher.from_keyring(pii_keyring(settings))
        audit_signer(settings)
    except ConfigError as exc:
        raise _fail(f"{exc}; nothing was decrypted", EXIT_REFUSED) from None
    alert = _find_alert(settings, alert_id, from_topic, file)
    os_user = getpass.getuser()
    from app.schemas import AuditItem

    item = AuditItem(transaction_id=alert.transaction_id, decision=alert.decision,
                     score=alert.fraud_score)
    common = dict(os_user=os_user, actor=analyst or os_user, action="alert.decrypt",
                  object_type="alert", object_id=alert.alert_id, audit_file=audit_file,
                  items=[item])
    try:
        pii = cipher.decrypt(alert.pii, associated_data(alert.alert_id, alert.transaction_id))
    except DecryptionError as exc:
        try:
            record_access(settings, outcome="failure", reason=f"{reason} [failed: {exc}]",
                          **common)  # type: ignore[arg-type]
        except Exception as audit_exc:  # report both, then stop
            console.print(f"[red]and the failed attempt could not be audited:[/red] {audit_exc}")
        raise _fail(f"cannot decrypt alert {alert_id}: {exc}", EXIT_FAILED) from None
    try:
        record_access(settings, outcome="success", reason=reason, **common)  # type: ignore[arg-type]
    except Exception as exc:  # any failure to audit: show nothing
        raise _fail(f"the access could not be audited ({exc}); nothing is shown",
                    EXIT_REFUSED) from None
    doc = _summary(alert)
    doc["pii"] = pii
    print(json.dumps(doc, indent=2))
    console.print(f"access audited (analyst {analyst or os_user}, key {alert.pii.kid})")
