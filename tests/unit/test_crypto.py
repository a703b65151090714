"""compliance.crypto against the real PostgreSQL: envelope encryption, AAD binding, erasure, rotation."""

from __future__ import annotations

import base64
import os
import stat
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cds.errors import ConfigError, CryptoError, ErasedError
from cds.settings import Settings
from cds.store.db import connect
from compliance import audit
from compliance.crypto import (
    COMPRESS_MIN_BYTES,
    FORMAT_V1,
    FORMAT_V2,
    NONCE_BYTES,
    FieldCipher,
    Kek,
    erase_subject,
    load_kek,
    load_kek_file,
    load_old_keks,
    make_tombstone,
    rotate_kek,
    write_kek_file,
)

AAD_1 = b"events.resource|ehr|Communication|1|1"
AAD_2 = b"events.resource|ehr|Communication|2|1"


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.delenv("CDS_KEK", raising=False)
    return Settings.from_env({"CDS_DATA_DIR": str(tmp_path)})


@pytest.fixture
def kek() -> Kek:
    return Kek.generate()


@pytest.fixture
def cipher(kek: Kek) -> FieldCipher:
    return FieldCipher(kek)


def test_roundtrip_uses_one_data_key_per_subject(db_conn: psycopg.Connection[Any], cipher: FieldCipher) -> None:
    a1 = cipher.encrypt(db_conn, "Patient/1", "我不想活了".encode(), AAD_1)
    a2 = cipher.encrypt(db_conn, "Patient/1", b"second", AAD_2)
    b1 = cipher.encrypt(db_conn, "Patient/2", b"other", AAD_1)
    db_conn.commit()
    assert cipher.decrypt(db_conn, a1, AAD_1).decode() == "我不想活了"
    assert cipher.decrypt(db_conn, a2, AAD_2) == b"second"
    assert cipher.decrypt(db_conn, b1, AAD_1) == b"other"
    assert "我不想活了".encode() not in a1
    assert a1[1:9] == a2[1:9] != b1[1:9]  # the DEK id in the header
    rows = db_conn.execute("SELECT subject, length(wrapped_key) FROM data_keys ORDER BY id").fetchall()
    assert [r[0] for r in rows] == ["Patient/1", "Patient/2"]
    # a fresh process (empty cache) with the same KEK reads it too
    assert FieldCipher(cipher.kek).decrypt(db_conn, a1, AAD_1).decode() == "我不想活了"


def test_same_plaintext_encrypts_differently(db_conn: psycopg.Connection[Any], cipher: FieldCipher) -> None:
    assert cipher.encrypt(db_conn, "Patient/1", b"x", AAD_1) != cipher.encrypt(db_conn, "Patient/1", b"x", AAD_1)


def test_ciphertext_swapped_into_another_row_is_rejected(db_conn: psycopg.Connection[Any],
                                                        cipher: FieldCipher) -> None:
    blob = cipher.encrypt(db_conn, "Patient/1", b"row one", AAD_1)
    with pytest.raises(CryptoError, match="AAD"):
        cipher.decrypt(db_conn, blob, AAD_2)


def test_tampered_ciphertext_or_header_is_rejected(db_conn: psycopg.Connection[Any], cipher: FieldCipher) -> None:
    cipher.encrypt(db_conn, "Patient/2", b"x", AAD_1)
    blob = bytearray(cipher.encrypt(db_conn, "Patient/1", b"row one", AAD_1))
    flipped = bytes(blob[:-1]) + bytes([blob[-1] ^ 1])
    with pytest.raises(CryptoError):
        cipher.decrypt(db_conn, flipped, AAD_1)
    other_key = bytes(blob[:8]) + bytes([blob[8] ^ 3]) + bytes(blob[9:])  # point at another DEK id
    with pytest.raises(CryptoError):
        cipher.decrypt(db_conn, other_key, AAD_1)
    with pytest.raises(CryptoError, match="short"):
        cipher.decrypt(db_conn, b"\x01abc", AAD_1)


def _signals_like(n: int) -> bytes:
    """Repetitive JSON like an assessment's signals (evidence spans of a conversation)."""
    span = '{"start": %d, "end": %d, "kind": "ideation", "ref": "Communication/7#payload[0]#%d", "text": "想自杀"}'
    return ("[" + ", ".join(span % (i, i + 3, i % 9) for i in range(n)) + "]").encode()


def test_long_repetitive_plaintext_is_sealed_compressed(db_conn: psycopg.Connection[Any],
                                                        cipher: FieldCipher) -> None:
    plaintext = _signals_like(60)
    blob = cipher.encrypt(db_conn, "Patient/1", plaintext, AAD_1)
    assert blob[0] == FORMAT_V2
    assert len(blob) < len(plaintext) // 4  # the row stays far below PostgreSQL's TOAST threshold
    assert cipher.decrypt(db_conn, blob, AAD_1) == plaintext
    assert FieldCipher(cipher.kek).decrypt(db_conn, blob, AAD_1) == plaintext  # a fresh process too
    value = {"signals": plaintext.decode()}
    assert cipher.decrypt_json(db_conn, cipher.encrypt_json(db_conn, "Patient/1", value, AAD_1), AAD_1) == value


def test_short_or_incompressible_plaintext_is_sealed_as_it_is(db_conn: psycopg.Connection[Any],
                                                              cipher: FieldCipher) -> None:
    short = _signals_like(60)[:COMPRESS_MIN_BYTES - 1]
    noise = os.urandom(4096)
    for plaintext in (short, noise, b""):
        blob = cipher.encrypt(db_conn, "Patient/1", plaintext, AAD_1)
        assert blob[0] == FORMAT_V1
        assert len(blob) == 9 + NONCE_BYTES + len(plaintext) + 16
        assert cipher.decrypt(db_conn, blob, AAD_1) == plaintext


def test_blobs_sealed_before_compression_still_open(db_conn: psycopg.Connection[Any], kek: Kek) -> None:
    """A long value sealed by the earlier code (version 1, no compression) reads the same today."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    cipher = FieldCipher(kek)
    cipher.encrypt(db_conn, "Patient/1", b"creates the data key", AAD_1)
    db_conn.commit()
    dek_id, wrapped = db_conn.execute("SELECT id, wrapped_key FROM data_keys WHERE subject = 'Patient/1'").fetchone()
    from compliance.crypto import unwrap_dek

    key = AESGCM(unwrap_dek(kek, "Patient/1", bytes(wrapped)))
    plaintext = _signals_like(60)
    header = bytes([FORMAT_V1]) + int(dek_id).to_bytes(8, "big")
    nonce = os.urandom(NONCE_BYTES)
    old_blob = header + nonce + key.encrypt(nonce, plaintext, header + AAD_1)
    assert cipher.decrypt(db_conn, old_blob, AAD_1) == plaintext


def test_version_byte_is_authenticated(db_conn: psycopg.Connection[Any], cipher: FieldCipher) -> None:
    """Relabelling a compressed blob as plain (or the other way round) fails authentication: the
    version is part of the AAD, so decompression never runs on anything the sealer did not write."""
    packed = cipher.encrypt(db_conn, "Patient/1", _signals_like(60), AAD_1)
    plain = cipher.encrypt(db_conn, "Patient/1", b"row one", AAD_1)
    for blob, other in ((packed, FORMAT_V1), (plain, FORMAT_V2)):
        with pytest.raises(CryptoError, match="authenticate"):
            cipher.decrypt(db_conn, bytes([other]) + blob[1:], AAD_1)
    with pytest.raises(CryptoError, match="version 3"):
        cipher.decrypt(db_conn, bytes([3]) + packed[1:], AAD_1)


def test_wrong_kek_cannot_unwrap(db_conn: psycopg.Connection[Any], cipher: FieldCipher) -> None:
    blob = cipher.encrypt(db_conn, "Patient/1", b"secret", AAD_1)
    db_conn.commit()
    with pytest.raises(CryptoError, match="KEK"):
        FieldCipher(Kek.generate()).decrypt(db_conn, blob, AAD_1)


def test_json_helpers_roundtrip(db_conn: psycopg.Connection[Any], cipher: FieldCipher) -> None:
    value = {"resourceType": "Communication", "payload": [{"contentString": "我很难过"}], "n": 1.5}
    blob = cipher.encrypt_json(db_conn, "Patient/1", value, AAD_1)
    assert cipher.decrypt_json(db_conn, blob, AAD_1) == value


def test_erasure_makes_text_unreadable_everywhere_and_is_audited(db_url: str, kek: Kek) -> None:
    writer, reader = FieldCipher(kek), FieldCipher(kek)
    with connect(db_url) as conn:
        blob = writer.encrypt(conn, "Patient/9", "想自杀".encode(), AAD_1)
        keep = writer.encrypt(conn, "Patient/10", b"keep", AAD_1)
        conn.commit()
        assert reader.decrypt(conn, blob, AAD_1) == "想自杀".encode()  # now cached in `reader`
        assert erase_subject(conn, "Patient/9", "PIPL Art. 47 request #42", "Practitioner/dpo") == 1
        conn.commit()
        for c in (writer, reader, FieldCipher(kek)):
            with pytest.raises(ErasedError):
                c.decrypt(conn, blob, AAD_1)
        assert reader.decrypt(conn, keep, AAD_1) == b"keep"
        row = conn.execute("SELECT wrapped_key, kek_id, destroyed_at IS NOT NULL, destroyed_reason"
                           " FROM data_keys WHERE subject = 'Patient/9'").fetchone()
        assert row == (None, None, True, "PIPL Art. 47 request #42")
        # erasing again destroys nothing more but is still recorded
        assert erase_subject(conn, "Patient/9", "repeat", "Practitioner/dpo") == 0
        conn.commit()
        erasures = audit.search(conn, event_type=audit.EventType.ERASURE)
        assert [r.patient_ref for r in erasures] == ["Patient/9", "Patient/9"]
        assert erasures[1].detail["keys_destroyed"] == 1 and erasures[1].actor == "Practitioner/dpo"
        assert "想自杀" not in str([r.entity for r in erasures] + [r.detail for r in erasures])
        result = audit.verify(conn)
        assert result.ok and result.checked == 2
        # new data for the same subject gets a new key and stays readable
        fresh = writer.encrypt(conn, "Patient/9", b"new", AAD_2)
        conn.commit()
        assert FieldCipher(kek).decrypt(conn, fresh, AAD_2) == b"new"
        with pytest.raises(ErasedError):
            writer.decrypt(conn, blob, AAD_1)


def test_erasure_needs_a_reason(db_conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(CryptoError, match="reason"):
        erase_subject(db_conn, "Patient/1", "  ", "x")


def test_rotation_rewraps_keys_so_old_data_reads_with_only_the_new_kek(db_url: str, kek: Kek) -> None:
    new = Kek.generate()
    old_cipher = FieldCipher(kek)
    with connect(db_url) as conn:
        blobs = {f"Patient/{i}": old_cipher.encrypt(conn, f"Patient/{i}", f"text {i}".encode(), AAD_1)
                 for i in range(5)}
        conn.commit()
        erase_subject(conn, "Patient/4", "test", "tester")
        conn.commit()
        before = conn.execute("SELECT id, wrapped_key FROM data_keys ORDER BY id").fetchall()
        # during the rotation a process holding both keys keeps working
        both = FieldCipher(new, old_keks=[kek])
        assert rotate_kek(conn, kek, new, actor="Practitioner/admin") == 4
        assert both.decrypt(conn, blobs["Patient/0"], AAD_1) == b"text 0"
        conn.commit()
        after = conn.execute("SELECT id, wrapped_key, kek_id FROM data_keys ORDER BY id").fetchall()
        assert [r[0] for r in after] == [r[0] for r in before]
        assert all(a[1] != b[1] for a, b in zip(after[:4], before[:4]))
        assert {r[2] for r in after[:4]} == {new.id} and after[4][2] is None
        only_new = FieldCipher(new)
        for i in range(4):
            assert only_new.decrypt(conn, blobs[f"Patient/{i}"], AAD_1) == f"text {i}".encode()
        with pytest.raises(ErasedError):
            only_new.decrypt(conn, blobs["Patient/4"], AAD_1)
        with pytest.raises(CryptoError, match="which this process does not have"):
            FieldCipher(kek).decrypt(conn, blobs["Patient/1"], AAD_1)
        rot = audit.search(conn, event_type=audit.EventType.KEY_ROTATION)[0]
        assert rot.entity == {"what": "data_keys", "old_kek_id": kek.id, "new_kek_id": new.id}
        assert rot.detail == {"rewrapped": 4, "other_keks_remaining": 0}
        assert audit.verify(conn).ok
        # a second run finds nothing left under the old key
        assert rotate_kek(conn, kek, new) == 0


def test_rolled_back_key_creation_is_never_reused(db_url: str, cipher: FieldCipher) -> None:
    with connect(db_url) as conn:
        cipher.encrypt(conn, "Patient/7", b"lost", AAD_1)
        conn.rollback()  # the key row is gone with the transaction
        blob = cipher.encrypt(conn, "Patient/7", b"kept", AAD_1)
        conn.commit()
        assert FieldCipher(cipher.kek).decrypt(conn, blob, AAD_1) == b"kept"
        # once committed (an older transaction), the subject cache serves it without a query
        blob2 = cipher.encrypt(conn, "Patient/7", b"again", AAD_2)
        conn.commit()
        assert blob2[1:9] == blob[1:9]


def test_concurrent_first_use_creates_one_key(db_url: str, kek: Kek) -> None:
    barrier = threading.Barrier(4)
    results: list[bytes] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with connect(db_url) as conn:
                c = FieldCipher(kek)
                barrier.wait()
                results.append(c.encrypt(conn, "Patient/race", b"x", AAD_1))
                conn.commit()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({r[1:9] for r in results}) == 1
    with connect(db_url) as conn:
        n = conn.execute("SELECT count(*) FROM data_keys WHERE subject = 'Patient/race'").fetchone()
        assert n == (1,)
        assert all(FieldCipher(kek).decrypt(conn, r, AAD_1) == b"x" for r in results)


def test_app_role_cannot_delete_data_keys(db_conn: psycopg.Connection[Any], cipher: FieldCipher) -> None:
    cipher.encrypt(db_conn, "Patient/1", b"x", AAD_1)
    db_conn.commit()
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        db_conn.execute("DELETE FROM data_keys")
    db_conn.rollback()


def test_retention_tombstone_reads_as_erased(db_conn: psycopg.Connection[Any], cipher: FieldCipher) -> None:
    with pytest.raises(ErasedError, match="retention"):
        cipher.decrypt(db_conn, make_tombstone("chat_message"), AAD_1)


def test_load_kek_refuses_a_missing_file_unless_asked_to_create(settings: Settings) -> None:
    with pytest.raises(ConfigError, match="CDS_KEK_FILE"):
        load_kek(settings)
    created = load_kek(settings, create=True)
    assert stat.S_IMODE(settings.kek_file.stat().st_mode) == 0o600
    assert load_kek(settings) == created
    assert len(created.id) == 16 and created.id != Kek.generate().id
    assert "key=" not in repr(created) or created.key.hex() not in repr(created)


def test_load_kek_rejects_bad_content_and_loose_permissions(settings: Settings, tmp_path: Path) -> None:
    path = settings.kek_file
    path.parent.mkdir(parents=True)
    path.write_text("not base64!!")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="base64"):
        load_kek(settings)
    path.write_text(base64.b64encode(b"short").decode())
    with pytest.raises(ConfigError, match="32-byte"):
        load_kek(settings)
    path.write_text(base64.b64encode(os.urandom(32)).decode())
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_kek(settings)


def test_load_kek_from_environment_wins(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    key = os.urandom(32)
    monkeypatch.setenv("CDS_KEK", base64.b64encode(key).decode())
    assert load_kek(settings).key == key
    monkeypatch.setenv("CDS_KEK", "bad")
    with pytest.raises(ConfigError, match="CDS_KEK"):
        load_kek(settings)


def test_old_keks_load_from_a_path_list(tmp_path: Path) -> None:
    a, b = Kek.generate(), Kek.generate()
    write_kek_file(tmp_path / "a.key", a)
    write_kek_file(tmp_path / "b.key", b)
    env = {"CDS_OLD_KEK_FILES": f"{tmp_path / 'a.key'}{os.pathsep}{tmp_path / 'b.key'}"}
    assert load_old_keks(env) == [a, b]
    assert load_kek_file(tmp_path / "a.key") == a
    assert load_old_keks({}) == []


def test_cached_keys_expire_within_the_ttl_but_not_all_together() -> None:
    """Keys loaded in the same second must not all be read again in the same second a TTL later; none
    may outlive the TTL (an erasure by another process takes effect within it)."""
    from compliance.crypto import _lifetime

    lifetimes = [_lifetime(i) for i in range(1, 2001)]
    assert all(0.75 <= f < 1.0 for f in lifetimes)
    # spread over the whole quarter: no 1/40 of it holds more than 5% of 2,000 consecutive ids
    buckets = [0] * 40
    for f in lifetimes:
        buckets[int((f - 0.75) * 160)] += 1
    assert max(buckets) <= 100 and min(buckets) > 0
