"""`fraudscore keys | audit | alerts` without servers (files instead of topics)."""

from __future__ import annotations

import base64
import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli import app
from app.schemas import Alert
from app.security.envelope import FieldCipher, associated_data
from app.security.keyring import load_keyring

runner = CliRunner()
PAN = "4539578763621486"
PII = {"card_number": PAN, "ip": "203.0.113.5", "email": "jane@example.org",
       "customer_id": "c1", "device_id": "d1"}


def b64() -> str:
    return base64.b64encode(os.urandom(32)).decode()


@pytest.fixture()
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in list(os.environ):
        if name.startswith("FRAUDSCORE_"):
            monkeypatch.delenv(name)
    keys = tmp_path / "keys"
    monkeypatch.setenv("FRAUDSCORE_PII_KEYRING_DIR", str(keys))
    monkeypatch.setenv("FRAUDSCORE_AUDIT_KEY", b64())
    return keys


def write_alerts(path: Path, cipher: FieldCipher, n: int = 3) -> list[str]:
    ids = []
    with path.open("w") as fh:
        for i in range(n):
            aid, tx = f"al-{i:03d}", f"tx-{i}"
            alert = Alert(alert_id=aid, transaction_id=tx, event_time=datetime.now(UTC),
                          scored_at=datetime.now(UTC), customer_token="tok", terminal_id="T1",
                          fraud_score=0.97, decision="block", model_version="m1", reasons=[],
                          pii=cipher.encrypt(PII, associated_data(aid, tx)))
            fh.write(alert.model_dump_json() + "\n")
            ids.append(aid)
    return ids


def test_keys_generate_rotate_list(env: Path) -> None:
    result = runner.invoke(app, ["keys", "generate"])
    assert result.exit_code == 0, result.output
    first = load_keyring(env).active
    assert runner.invoke(app, ["keys", "generate"]).exit_code == 2  # refuses to overwrite
    result = runner.invoke(app, ["keys", "rotate"])
    assert result.exit_code == 0 and load_keyring(env).active != first
    result = runner.invoke(app, ["keys", "list"])
    assert result.exit_code == 0 and first in result.output and "600" in result.output
    (env / f"{first}.key").chmod(0o644)
    result = runner.invoke(app, ["keys", "rotate"])
    assert result.exit_code == 2 and "chmod 600" in result.output


def test_envelope_mode_from_the_cli(env: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    master = tmp_path / "master.key"
    assert runner.invoke(app, ["keys", "new-master", str(master)]).exit_code == 0
    assert oct(master.stat().st_mode & 0o777) == "0o600"
    assert runner.invoke(app, ["keys", "generate", "--master-key-file", str(master)]).exit_code == 0
    result = runner.invoke(app, ["keys", "list"])
    assert "local:" in result.output
    monkeypatch.setenv("FRAUDSCORE_MASTER_KEY_FILE", str(master))
    assert runner.invoke(app, ["keys", "rotate"]).exit_code == 0


def test_alerts_show_and_audited_decrypt(env: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    runner.invoke(app, ["keys", "generate"])
    cipher = FieldCipher.from_keyring(load_keyring(env))
    alerts, audit = tmp_path / "alerts.jsonl", tmp_path / "audit.jsonl"
    ids = write_alerts(alerts, cipher)

    shown = runner.invoke(app, ["alerts", "show", ids[1], "--file", str(alerts)])
    assert shown.exit_code == 0 and PAN not in shown.output and "encrypted" in shown.output

    result = runner.invoke(app, ["alerts", "decrypt", ids[1], "--file", str(alerts),
                                 "--reason", f"chargeback case 17, card {PAN}",
                                 "--analyst", "j.smith", "--audit-file", str(audit)])
    assert result.exit_code == 0, result.output
    assert PAN in result.stdout and "203.0.113.5" in result.stdout
    (record,) = [json.loads(line) for line in audit.read_text().splitlines()]
    assert record["action"] == "alert.decrypt" and record["outcome"] == "success"
    assert record["actor"] == "j.smith" and record["object_id"] == ids[1]
    assert "chargeback case 17" in record["reason"] and PAN not in audit.read_text()
    assert record["items"][0]["transaction_id"] == "tx-1"

    assert runner.invoke(app, ["alerts", "decrypt", "al-none", "--file", str(alerts),
                               "--reason", "looking around", "--audit-file",
                               str(audit)]).exit_code == 4

    # a ciphertext moved to another alert fails, and the failure is audited
    lines = alerts.read_text().splitlines()
    docs = [json.loads(line) for line in lines]
    docs[0]["pii"] = docs[2]["pii"]
    alerts.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    result = runner.invoke(app, ["alerts", "decrypt", ids[0], "--file", str(alerts),
                                 "--reason", "case 18", "--audit-file", str(audit)])
    assert result.exit_code == 1 and "another alert" in result.output and PAN not in result.output
    assert json.loads(audit.read_text().splitlines()[-1])["outcome"] == "failure"

    verified = runner.invoke(app, ["audit", "verify", "--file", str(audit)])
    assert verified.exit_code == 0, verified.output
    text = audit.read_text().replace('"outcome":"failure"', '"outcome":"success"')
    audit.write_text(text)
    broken = runner.invoke(app, ["audit", "verify", "--file", str(audit)])
    assert broken.exit_code == 1 and "first broken link" in broken.output

    # without the key: a clear refusal, nothing decrypted
    monkeypatch.delenv("FRAUDSCORE_PII_KEYRING_DIR")
    result = runner.invoke(app, ["alerts", "decrypt", ids[2], "--file", str(alerts),
                                 "--reason", "case 19", "--audit-file", str(audit)])
    assert result.exit_code == 3 and "no decryption key" in result.output
    assert PAN not in result.output
    # a key directory holding other keys: refused for want of the right key id
    other = tmp_path / "other"
    monkeypatch.setenv("FRAUDSCORE_PII_KEYRING_DIR", str(other))
    runner.invoke(app, ["keys", "generate"])
    result = runner.invoke(app, ["alerts", "decrypt", ids[2], "--file", str(alerts),
                                 "--reason", "case 19", "--audit-file", str(audit)])
    assert result.exit_code == 1 and "no key with id" in result.output and PAN not in result.output


def test_decrypt_refuses_without_an_audit_key(env: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    runner.invoke(app, ["keys", "generate"])
    alerts = tmp_path / "alerts.jsonl"
    ids = write_alerts(alerts, FieldCipher.from_keyring(load_keyring(env)))
    monkeypatch.delenv("FRAUDSCORE_AUDIT_KEY")
    result = runner.invoke(app, ["alerts", "decrypt", ids[0], "--file", str(alerts),
                                 "--reason", "case 20"])
    assert result.exit_code == 3 and "no audit key" in result.output and PAN not in result.output
    assert runner.invoke(app, ["audit", "verify", "--file", str(alerts)]).exit_code == 3
