"""Transport security on real servers: Kafka SASL (PLAIN, SCRAM-SHA-256) over TLS, and Redis
with an ACL user, a password and TLS (`rediss://`).

The fixtures start their own extra servers next to the local stack, from the same binaries:
one Kafka broker (KRaft, the stack's cached 3.9.1 jars) whose client listener is SASL_SSL
(a PEM keystore signed by a throwaway CA; SCRAM credentials created at format time), and one
redis-server whose default user is off and whose only user may touch its own key prefix,
over TLS and plain TCP. Both are stopped at the end of the module.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from app.factory import redis_client
from app.sources import transactions_to_json
from features.online import RedisFeatureStore
from models.registry import ModelRef

pytestmark = pytest.mark.integration

KAFKA_LIBS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) \
    / "fraudscore" / "kafka-3.9.1" / "libs"
PREFIX = "sec"  # the Redis ACL user may only touch keys starting with this
N_EVENTS = 400


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_tls_material(folder: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fraudscore test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    pem_cert = cert.public_bytes(serialization.Encoding.PEM)
    paths = {"ca": folder / "ca.pem", "cert": folder / "server.pem",
             "key": folder / "server.key", "keystore": folder / "keystore.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(pem_cert)
    paths["key"].write_bytes(pem_key)
    paths["keystore"].write_bytes(pem_key + pem_cert)
    for p in (paths["key"], paths["keystore"]):
        p.chmod(0o600)
    return paths


def start_redis(folder: Path, tls: dict[str, Path], password: str
                ) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    port, tls_port = free_port(), free_port()
    conf = folder / "redis.conf"
    conf.write_text("\n".join([
        "bind 127.0.0.1", f"port {port}", f"tls-port {tls_port}",
        f"tls-cert-file {tls['cert']}", f"tls-key-file {tls['key']}",
        f"tls-ca-cert-file {tls['ca']}", "tls-auth-clients no", 'save ""', "appendonly no",
        f"dir {folder}", "user default off",
        f"user scorer on >{password} ~{PREFIX}* &* +@all -@dangerous", ""]))
    proc = subprocess.Popen(["redis-server", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    return proc, {"port": port, "tls_port": tls_port, "password": password}


def start_kafka(folder: Path, tls: dict[str, Path], secrets: dict[str, str]
                ) -> tuple[subprocess.Popen[bytes], str]:
    port, internal, controller = free_port(), free_port(), free_port()
    props = folder / "server.properties"
    props.write_text("\n".join([
        "process.roles=broker,controller", "node.id=1",
        f"controller.quorum.voters=1@127.0.0.1:{controller}",
        f"listeners=SASL_SSL://127.0.0.1:{port},INTERNAL://127.0.0.1:{internal},"
        f"CONTROLLER://127.0.0.1:{controller}",
        f"advertised.listeners=SASL_SSL://127.0.0.1:{port},INTERNAL://127.0.0.1:{internal}",
        "listener.security.protocol.map=SASL_SSL:SASL_SSL,INTERNAL:PLAINTEXT,"
        "CONTROLLER:PLAINTEXT",
        "controller.listener.names=CONTROLLER", "inter.broker.listener.name=INTERNAL",
        "sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256",
        "listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain."
        f'PlainLoginModule required user_producer="{secrets["plain"]}";',
        "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common."
        "security.scram.ScramLoginModule required;",
        "ssl.keystore.type=PEM", f"ssl.keystore.location={tls['keystore']}",
        f"log.dirs={folder / 'data'}",
        "offsets.topic.replication.factor=1", "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1", "min.insync.replicas=1",
        "default.replication.factor=1", "offsets.topic.num.partitions=3",
        "transaction.state.log.num.partitions=3", "group.initial.rebalance.delay.ms=0",
        "auto.create.topics.enable=false", ""]))
    log4j = folder / "log4j.properties"
    log4j.write_text(f"log4j.rootLogger=WARN, file\nlog4j.appender.file="
                     f"org.apache.log4j.FileAppender\nlog4j.appender.file.File="
                     f"{folder / 'kafka.log'}\nlog4j.appender.file.layout="
                     "org.apache.log4j.PatternLayout\n")
    java = ["java", f"-Dlog4j.configuration=file:{log4j}", "-cp", f"{KAFKA_LIBS}/*"]
    cluster = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=").replace("-", "a")
    subprocess.run([*java, "kafka.tools.StorageTool", "format", "-t", cluster, "-c", str(props),
                    "--add-scram", f"SCRAM-SHA-256=[name=scorer,password={secrets['scram']}]"],
                   check=True, capture_output=True, timeout=120)
    proc = subprocess.Popen([*java[:1], "-Xms64m", "-Xmx256m", *java[1:], "kafka.Kafka",
                             str(props)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, f"127.0.0.1:{port}"


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Both extra servers, started side by side; stopped when the module is done."""
    for tool in ("java", "redis-server"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (scripts/stack.sh up installs what it needs)")
    if not KAFKA_LIBS.is_dir():
        pytest.skip(f"no Kafka jars in {KAFKA_LIBS}: run scripts/stack.sh up once")
    folder = tmp_path_factory.mktemp("secure")
    tls = write_tls_material(folder)
    secrets = {"redis": "r-" + uuid.uuid4().hex, "plain": "p-" + uuid.uuid4().hex,
               "scram": "s-" + uuid.uuid4().hex}
    redis_proc, redis_info = start_redis(folder, tls, secrets["redis"])
    kafka_proc, bootstrap = start_kafka(folder, tls, secrets)
    try:
        scram = {"bootstrap.servers": bootstrap, "security.protocol": "SASL_SSL",
                 "sasl.mechanism": "SCRAM-SHA-256", "sasl.username": "scorer",
                 "sasl.password": secrets["scram"], "ssl.ca.location": str(tls["ca"])}
        deadline = time.monotonic() + 90
        while True:
            if kafka_proc.poll() is not None:
                pytest.fail(f"the SASL broker exited: {(folder / 'kafka.log').read_text()[-2000:]}")
            try:
                if AdminClient(scram).list_topics(timeout=3).brokers:
                    break
            except Exception:  # not up yet
                pass
            if time.monotonic() > deadline:
                pytest.fail("the SASL broker did not answer within 90 s")
            time.sleep(0.5)
        plain = {**scram, "sasl.mechanism": "PLAIN", "sasl.username": "producer",
                 "sasl.password": secrets["plain"]}
        yield {"tls": tls, "secrets": secrets, "redis": redis_info, "scram": scram,
               "plain": plain, "folder": folder}
    finally:
        stop(kafka_proc)
        stop(redis_proc)


def test_redis_requires_the_acl_user_and_its_key_prefix(secure: dict[str, Any]) -> None:
    info, ca = secure["redis"], secure["tls"]["ca"]
    tls_url = f"rediss://scorer:{info['password']}@127.0.0.1:{info['tls_port']}/0" \
              f"?ssl_ca_certs={ca}"
    acl_url = f"redis://scorer:{info['password']}@127.0.0.1:{info['port']}/0"
    for url in (tls_url, acl_url):
        client = redis_client(url)
        assert client.ping()
        RedisFeatureStore(client, namespace=f"{PREFIX}-probe").ping()
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.set("outside-the-prefix", 1)
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis_client(f"redis://127.0.0.1:{info['port']}/0").ping()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis_client(f"redis://scorer:wrong@127.0.0.1:{info['port']}/0").ping()
    with pytest.raises(redis.exceptions.ConnectionError):  # no TLS on the TLS port
        redis_client(f"redis://scorer:{info['password']}@127.0.0.1:{info['tls_port']}/0").ping()


def test_kafka_refuses_wrong_credentials_and_plaintext(secure: dict[str, Any]) -> None:
    wrong = {**secure["scram"], "sasl.password": "wrong"}
    with pytest.raises(KafkaException, match=r"transport|Authentication|timed out"):
        AdminClient(wrong).list_topics(timeout=3)
    plaintext = {"bootstrap.servers": secure["scram"]["bootstrap.servers"]}
    with pytest.raises(KafkaException, match=r"transport|timed out"):
        AdminClient(plaintext).list_topics(timeout=3)


def consume(config: dict[str, Any], topics: list[str], want: int, timeout_s: float = 120
            ) -> dict[str, list[bytes]]:
    c = Consumer({**config, "group.id": f"reader-{uuid.uuid4().hex[:8]}",
                  "auto.offset.reset": "earliest", "isolation.level": "read_committed"})
    c.subscribe(topics)
    seen: dict[str, list[bytes]] = {t: [] for t in topics}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and sum(map(len, seen.values())) < want:
        for msg in c.consume(500, 0.5):
            if msg.error() is None:
                seen[msg.topic()].append(msg.value())
            elif msg.error().code() != KafkaError._PARTITION_EOF:
                raise AssertionError(msg.error())
    c.close()
    return seen


def test_scorer_runs_over_sasl_ssl_kafka_and_acl_tls_redis(
    secure: dict[str, Any], model: ModelRef, simulated: tuple[pd.DataFrame, pd.DataFrame],
    keys_env: dict[str, str], tmp_path: Path,
) -> None:
    suffix = uuid.uuid4().hex[:8]
    topics = {n: f"{n}-{suffix}" for n in ("transactions", "labels", "alerts", "scores",
                                           "dlq", "audit")}
    scram, plain = secure["scram"], secure["plain"]
    admin = AdminClient(scram)
    for f in admin.create_topics([NewTopic(t, num_partitions=2) for t in topics.values()]
                                 ).values():
        f.result(timeout=30)
    tx = simulated[0].iloc[:N_EVENTS]
    producer = Producer({**plain, "acks": "all"})  # SASL/PLAIN for the producer side
    for key, value in zip(tx["customer_id"], transactions_to_json(tx), strict=True):
        producer.produce(topics["transactions"], value, key.encode())
    assert producer.flush(60) == 0

    info, ca = secure["redis"], secure["tls"]["ca"]
    kafka_config = {k: v for k, v in scram.items() if k != "bootstrap.servers"}
    env = {
        **os.environ, **keys_env,
        "FRAUDSCORE_KAFKA_BOOTSTRAP_SERVERS": scram["bootstrap.servers"],
        "FRAUDSCORE_KAFKA_CONFIG": json.dumps(kafka_config),
        "FRAUDSCORE_REDIS_URL": f"rediss://scorer:{info['password']}@127.0.0.1:"
                                f"{info['tls_port']}/0?ssl_ca_certs={ca}",
        "FRAUDSCORE_REDIS_NAMESPACE": f"{PREFIX}-{suffix}",
        "FRAUDSCORE_GROUP_ID": f"scorer-{suffix}", "FRAUDSCORE_MODEL_DIR": str(model.path),
        "FRAUDSCORE_METRICS_PORT": "0",
        **{f"FRAUDSCORE_TOPIC_{k.upper()}": v for k, v in topics.items()},
    }
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL"):
        env.pop(name, None)
    log_path = tmp_path / "scorer.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app", "run"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            seen = consume(scram, [topics["scores"]], N_EVENTS)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
    logs = log_path.read_bytes()
    assert code == 0, logs.decode(errors="replace")[-3000:]
    assert len(seen[topics["scores"]]) == N_EVENTS
    for secret in secure["secrets"].values():
        assert secret.encode() not in logs

    r = redis_client(env["FRAUDSCORE_REDIS_URL"])
    assert next(r.scan_iter(match=f"{PREFIX}-{suffix}:*"), None) is not None
    verified = subprocess.run([sys.executable, "-m", "app", "audit", "verify", "--topic",
                               topics["audit"]], env=env, capture_output=True, timeout=180)
    assert verified.returncode == 0, verified.stderr.decode()
    assert b"audit trail verified" in verified.stderr
