"""Key directories, rotation, envelope mode, and the AES-GCM envelopes themselves."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import pytest

from app.schemas import PiiEnvelope
from app.security.envelope import DecryptionError, FieldCipher, associated_data
from app.security.keyring import (
    KeyringWatcher,
    KeyWrapper,
    LocalFileKeyWrapper,
    generate,
    list_keys,
    load_keyring,
    rotate,
    wrapper_from_spec,
)
from app.security.tokens import KeyMaterialError, load_key

AAD = associated_data("al-1", "tx-1")
PII = {"card_number": "4539578763621486", "ip": "203.0.113.9", "email": "a@b.example"}


def master(tmp_path: Path) -> Path:
    path = tmp_path / "master.key"
    path.write_text(base64.b64encode(os.urandom(32)).decode())
    path.chmod(0o600)
    return path


# ---- envelopes ----------------------------------------------------------------------------


def test_envelope_round_trip_and_every_failure_is_a_clear_error() -> None:
    key, other = os.urandom(32), os.urandom(32)
    cipher = FieldCipher({"k1": key}, "k1")
    env = cipher.encrypt(PII, AAD)
    assert cipher.decrypt(env, AAD) == PII
    assert "4539" not in env.model_dump_json()

    with pytest.raises(DecryptionError, match="wrong key, tampered ciphertext"):
        FieldCipher({"k1": other}, "k1").decrypt(env, AAD)  # same id, wrong key
    with pytest.raises(DecryptionError, match=r"no key with id 'k1'.*held: k9"):
        FieldCipher({"k9": key}, "k9").decrypt(env, AAD)
    raw = bytearray(base64.b64decode(env.ciphertext))
    raw[3] ^= 1
    tampered = env.model_copy(update={"ciphertext": base64.b64encode(bytes(raw)).decode()})
    with pytest.raises(DecryptionError, match="tampered"):
        cipher.decrypt(tampered, AAD)
    with pytest.raises(DecryptionError, match="belongs to another alert"):
        cipher.decrypt(env, associated_data("al-2", "tx-1"))  # moved to another alert
    with pytest.raises(DecryptionError):
        cipher.decrypt(PiiEnvelope(kid="k1", nonce="!!", ciphertext="x"), AAD)


# ---- key files and directories ------------------------------------------------------------


def test_key_files_readable_by_others_or_malformed_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "pii.key"
    path.write_text(base64.b64encode(os.urandom(32)).decode())
    path.chmod(0o644)
    with pytest.raises(KeyMaterialError, match=f"chmod 600 {path}"):
        load_key(None, path, "pii_key", length=32)
    path.chmod(0o600)
    assert len(load_key(None, path, "pii_key", length=32)) == 32
    path.write_text("not base64 at all!")
    with pytest.raises(KeyMaterialError, match="not valid base64"):
        load_key(None, path, "pii_key", length=32)

    ring = tmp_path / "ring"
    kid = generate(ring)
    key_file = ring / f"{kid}.key"
    key_file.chmod(0o640)
    with pytest.raises(KeyMaterialError, match=f"accessible by group/others.*chmod 600 {key_file}"):
        load_keyring(ring)
    key_file.chmod(0o600)
    ring.chmod(0o777)
    with pytest.raises(KeyMaterialError, match=f"chmod 700 {ring}"):
        load_keyring(ring)
    ring.chmod(0o700)
    original = key_file.read_text()
    for broken in ("{not json", json.dumps({"kid": kid, "alg": "A256GCM", "key": "AAAA"}),
                   json.dumps({"kid": "other", "alg": "A256GCM", "key": "AAAA"}), "[]"):
        key_file.write_text(broken)
        with pytest.raises(KeyMaterialError, match=r"keys rotate --dir|rename it") as info:
            load_keyring(ring)
        assert str(key_file) in str(info.value)
    key_file.write_text(original)
    (ring / "ACTIVE").write_text("k-missing\n")
    with pytest.raises(KeyMaterialError, match="names key 'k-missing'"):
        load_keyring(ring)


def test_generate_rotate_list_keep_old_keys_for_decryption(tmp_path: Path) -> None:
    ring = tmp_path / "keys"
    first = generate(ring)
    assert oct(ring.stat().st_mode & 0o777) == "0o700"
    assert oct((ring / f"{first}.key").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(KeyMaterialError, match="already holds keys; use `fraudscore keys rotate"):
        generate(ring)
    old = FieldCipher.from_keyring(load_keyring(ring))
    env = old.encrypt(PII, AAD)
    second = rotate(ring)
    ring_now = load_keyring(ring)
    assert ring_now.active == second and set(ring_now.keys) == {first, second}
    new = FieldCipher.from_keyring(ring_now)
    assert new.encrypt(PII, AAD).kid == second
    assert new.decrypt(env, AAD) == PII  # written before the rotation, still readable
    infos = list_keys(ring)
    assert [i.active for i in infos] == [False, True] and {i.mode for i in infos} == {"600"}
    assert "key" not in json.dumps([i.__dict__ for i in infos]).replace("kid", "")


def test_envelope_mode_wraps_data_keys_under_the_master_key(tmp_path: Path) -> None:
    wrapper = LocalFileKeyWrapper.from_file(master(tmp_path))
    assert isinstance(wrapper, KeyWrapper)
    ring = tmp_path / "keys"
    kid = generate(ring, wrapper)
    doc = json.loads((ring / f"{kid}.key").read_text())
    assert "key" not in doc and doc["wrapper"] == wrapper.wrapper_id
    cipher = FieldCipher.from_keyring(load_keyring(ring, wrapper))
    env = cipher.encrypt(PII, AAD)
    with pytest.raises(KeyMaterialError, match="FRAUDSCORE_MASTER_KEY_FILE"):
        load_keyring(ring)  # no master key: the directory alone opens nothing
    other = LocalFileKeyWrapper(os.urandom(32))
    with pytest.raises(KeyMaterialError, match="configured master key is"):
        load_keyring(ring, other)
    rotate(ring, wrapper)
    assert FieldCipher.from_keyring(load_keyring(ring, wrapper)).decrypt(env, AAD) == PII
    # a wrapped key renamed to another id does not unwrap
    doc["kid"] = "kevil"
    path = ring / "kevil.key"
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    with pytest.raises(KeyMaterialError, match="cannot unwrap key 'kevil'"):
        load_keyring(ring, wrapper)


class _Rot13Wrapper:
    """A plug-in wrapper the way a KMS adapter would look (here: no security at all)."""

    wrapper_id = "test:xor"

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        return bytes(b ^ 0x5A for b in data_key)

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        return bytes(b ^ 0x5A for b in wrapped)


def make_test_wrapper() -> _Rot13Wrapper:
    return _Rot13Wrapper()


def test_plug_in_wrappers_load_by_module_path(tmp_path: Path) -> None:
    wrapper = wrapper_from_spec(f"{__name__}:make_test_wrapper", None)
    assert wrapper is not None and wrapper.wrapper_id == "test:xor"
    generate(tmp_path / "k", wrapper)
    assert len(load_keyring(tmp_path / "k", wrapper).keys) == 1
    assert wrapper_from_spec("local", None) is None
    with pytest.raises(KeyMaterialError, match=r"package\.module:factory"):
        wrapper_from_spec("nonsense", None)
    with pytest.raises(KeyMaterialError, match="cannot be loaded"):
        wrapper_from_spec("no_such_module_xyz:make", None)


def test_watcher_reloads_when_the_active_pointer_changes(tmp_path: Path) -> None:
    ring = tmp_path / "keys"
    generate(ring)
    seen: list[str] = []
    errors: list[str] = []
    watcher = KeyringWatcher(ring, None, lambda r: seen.append(r.active),
                             lambda e: errors.append(str(e)))
    assert watcher.poll() is False
    new = rotate(ring)
    assert watcher.poll() is True and seen == [new]
    assert watcher.poll() is False
    # a broken directory keeps the keys in use and reports the problem
    watcher.retry_s = 0.0
    (ring / "ACTIVE").write_text("k-missing\n")
    assert watcher.poll() is False and "k-missing" in errors[-1]
    time.sleep(0.01)
    (ring / "ACTIVE").write_text(new + "\n")
    assert watcher.poll() is True and seen[-1] == new
