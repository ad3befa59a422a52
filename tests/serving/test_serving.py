"""The inference service: predictor mapping, endpoints, fuzzing (no 5xx), hot reload under load."""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pep_torchrec.config import ConfigError
from pep_torchrec.data.loader import ParquetBatchLoader
from pep_torchrec.data.schema import MAX_VALUE_CHARS
from pep_torchrec.data.vocab import load_vocab
from pep_torchrec.export.converter import ArtifactConverter
from pep_torchrec.export.serving_model import load_artifact
from pep_torchrec.serving.app import Settings, create_app
from pep_torchrec.serving.local import free_port, wait_ready
from pep_torchrec.serving.predictor import Predictor, RequestError
from tests.helpers.export import make_run

EXAMPLE = {
    "user_id": 196,
    "item_id": 242,
    "age": 49,
    "gender": "M",
    "occupation": "writer",
    "zip": "55105",
    "genres": ["Comedy"],
}


TOKEN = "s3cret-admin-token"
ADMIN = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, ml100k_data):  # noqa: F811
    root = tmp_path_factory.mktemp("serve")
    run_a = make_run(root, ml100k_data, stage="retrain", model="fm", dim=16, seed=1)
    run_b = make_run(root, ml100k_data, stage="retrain", model="deepfm", dim=16, seed=2)
    ArtifactConverter(run_a).convert(root / "a")
    ArtifactConverter(run_b).convert(root / "b", dtype="int8")
    return root / "a", root / "b"


def test_raw_values_map_like_the_pipeline(artifacts, ml100k_data):  # noqa: F811
    """Raw values rebuilt from the vocabulary score exactly like the prepared Parquet ids."""
    predictor = Predictor.from_path(artifacts[0])
    vocab = load_vocab(ml100k_data)
    batch = next(iter(ParquetBatchLoader(ml100k_data, "test", batch_size=64, prefetch=0)))
    features = batch.sparse_features.to_dict()
    instances = []
    for i in range(64):
        inst = {}
        for name, jt in features.items():
            ids = jt.values()[jt.offsets()[i] : jt.offsets()[i + 1]].tolist()
            raw = [vocab[name].values[j - 1].as_py() for j in ids]
            inst[name] = (
                raw
                if name == "genres"
                else (int(raw[0]) if name in ("user_id", "item_id", "age") else raw[0])
            )
        instances.append(inst)
    scores = predictor.predict(instances)
    want = torch.sigmoid(predictor.artifact.logits(batch.dense_features, batch.sparse_features))
    np.testing.assert_allclose(scores, want.numpy(), rtol=0, atol=1e-6)
    # Unknown values go to the OOV id.
    dense, kjt = predictor.features([dict(EXAMPLE, user_id=10**9, zip="nowhere", genres=["nope", "Comedy"])])
    assert kjt["user_id"].values().tolist() == [0] and kjt["zip"].values().tolist() == [0]
    assert kjt["genres"].values()[0].item() == 0 and kjt["genres"].values()[1].item() > 0


def test_avazu_raw_hour_is_derived_like_the_pipeline(tmp_path):
    """Avazu clients send the raw `hour` (YYMMDDHH); the service derives hour_of_day and weekday with
    the pipeline's own decoder, and names the field when a value is not a date."""
    from pep_torchrec.data.prepare import PrepareOptions, prepare_dataset
    from pep_torchrec.serving.predictor import RequestError
    from tests.helpers.data import AVAZU_HEADER, avazu_line

    raw = tmp_path / "train.csv"
    raw.write_text(
        "\n".join(
            [
                AVAZU_HEADER,
                avazu_line(1, "1", "14102100"),
                avazu_line(2, "0", "14102623", site="s2"),
                avazu_line(3, "1", "14102712"),
            ]
        )
        + "\n"
    )
    data = tmp_path / "avazu"
    prepare_dataset("avazu", raw, data, PrepareOptions(min_count=1, split_fractions="1,0,0"))
    run = make_run(tmp_path, data, stage="retrain", model="fm", dim=8)
    ArtifactConverter(run).convert(tmp_path / "art")
    predictor = Predictor.from_path(tmp_path / "art")
    assert "hour" in predictor.fields and "hour_of_day" not in predictor.fields
    columns = AVAZU_HEADER.split(",")
    instance = {
        k: v
        for k, v in zip(columns, avazu_line(2, "0", "14102623", site="s2").split(","))
        if k not in ("id", "click")
    }
    instance["hour"] = int(instance["hour"])
    _, kjt = predictor.features([instance])
    vocab = load_vocab(data)
    ids = {
        name: vocab[name].values.to_pylist().index(key) + 1
        for name, key in (("hour_of_day", "23"), ("weekday", "6"))
    }
    assert kjt["hour_of_day"].values().tolist() == [ids["hour_of_day"]]  # 2014-10-26 was a Sunday
    assert kjt["weekday"].values().tolist() == [ids["weekday"]]
    assert 0 < predictor.predict([instance, predictor.example_instance()])[0] < 1
    with pytest.raises(RequestError) as bad:
        predictor.predict([dict(instance, hour=14023112)])  # 31 February
    assert bad.value.loc == ["instances", 0, "hour"] and "YYMMDDHH" in str(bad.value)


def test_endpoints(artifacts):
    with TestClient(create_app(Settings(artifact=str(artifacts[0]), max_instances=8))) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["model_version"]
        r = client.post("/v1/predict", json={"instances": [EXAMPLE, EXAMPLE]})
        assert r.status_code == 200 and len(r.json()["scores"]) == 2
        assert r.json()["model_version"] == ready.json()["model_version"]
        cases = [
            ({"instances": [dict(EXAMPLE, bogus=1)]}, "bogus"),
            ({"instances": [dict(EXAMPLE, age="49")]}, "age"),
            ({"instances": [{k: v for k, v in EXAMPLE.items() if k != "zip"}]}, "zip"),
            ({"instances": [dict(EXAMPLE, genres="Comedy")]}, "genres"),
            ({"instances": [EXAMPLE] * 9}, "instances"),
            ({"instances": []}, "instances"),
            ({"rows": [EXAMPLE]}, "rows"),
        ]
        for body, field in cases:
            r = client.post("/v1/predict", json=body)
            assert r.status_code == 422, (body, r.text)
            assert any(field in [str(p) for p in d["loc"]] for d in r.json()["detail"]), r.json()
        r = client.post(
            "/v1/predict",
            content=b"{" + b" " * (2 << 20) + b"}",
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 413
        metrics = client.get("/metrics").text
        assert 'pep_requests_total{path="/v1/predict",method="POST",status="200"} 1' in metrics
        assert "pep_request_latency_seconds_bucket" in metrics and "pep_predict_batch_size_count 1" in metrics
        schema = client.get("/openapi.json").json()
        assert "/v1/predict" in schema["paths"] and "PredictRequest" in schema["components"]["schemas"]


def test_bad_artifact_refused_at_start_and_reload(artifacts, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{}")
    with pytest.raises(Exception, match="manifest"):
        with TestClient(create_app(Settings(artifact=str(bad)))):
            pass
    root = os.path.commonpath([bad, artifacts[0]])
    with TestClient(
        create_app(Settings(artifact=str(artifacts[0]), admin_token=TOKEN, artifact_root=root))
    ) as client:
        version = client.get("/readyz").json()["model_version"]
        r = client.post("/admin/reload", json={"artifact": str(bad)}, headers=ADMIN)
        assert r.status_code == 409 and "manifest" in r.json()["detail"][0]["msg"]
        assert root not in r.text  # no filesystem paths in responses
        r = client.post("/v1/predict", json={"instances": [EXAMPLE]})
        assert r.status_code == 200 and r.json()["model_version"] == version


_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
)
_json = st.recursive(
    _json_scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=8,
)
_field_values = {
    "user_id": st.integers(-5, 2000) | _json,
    "item_id": st.integers(-5, 2000) | _json,
    "age": st.integers(0, 100) | _json,
    "gender": st.sampled_from(["M", "F", ""]) | _json,
    "occupation": st.text(max_size=10) | _json,
    "zip": st.text(max_size=8) | _json,
    "genres": st.lists(st.sampled_from(["Comedy", "Drama", "x"]), max_size=5) | _json,
}
_instance = (
    st.fixed_dictionaries({}, optional={k: v for k, v in _field_values.items()})
    | st.fixed_dictionaries({k: v for k, v in _field_values.items()})
    | _json
)
_body = st.fixed_dictionaries({"instances": st.lists(_instance, max_size=5)}) | _json


def test_fuzz_predict_never_5xx(artifacts):
    """≥ 1,000 generated bodies (valid, half-valid and garbage): every answer is 200, 413 or 422."""
    statuses: list[int] = []
    with TestClient(
        create_app(Settings(artifact=str(artifacts[0]), max_instances=4)), raise_server_exceptions=False
    ) as client:

        @settings(
            max_examples=1100,
            deadline=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(body=_body)
        def check(body):
            # json.dumps writes NaN/Infinity (as Python's parser, and so the server, accepts them).
            r = client.post(
                "/v1/predict", content=json.dumps(body), headers={"content-type": "application/json"}
            )
            statuses.append(r.status_code)
            assert r.status_code in (200, 413, 422), (body, r.status_code, r.text[:300])
            if r.status_code == 200:
                assert all(0.0 <= s <= 1.0 for s in r.json()["scores"])

        check()
        raw = [b"", b"null", b"[]", b'{"instances": 5}', b"\xff\xfe", b'{"instances": [' * 50]
        for content in raw:
            r = client.post("/v1/predict", content=content, headers={"content-type": "application/json"})
            statuses.append(r.status_code)
            assert r.status_code in (400, 413, 422), (content, r.status_code)
    assert len(statuses) >= 1000 and 200 in statuses and 422 in statuses


def test_hot_reload_under_load(artifacts, tmp_path):
    """Reloads swapping two artifacts (and one refused corrupt one) while 4 clients send requests:
    every request succeeds, each answered by one of the two models."""
    import uvicorn

    port = free_port()
    bad = tmp_path / "corrupt"
    root = os.path.commonpath([bad, artifacts[0]])
    app = create_app(Settings(artifact=str(artifacts[0]), admin_token=TOKEN, artifact_root=root))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, timeout_s=30, alive=thread.is_alive)
    versions = {load_artifact(a).version for a in artifacts}
    import shutil

    shutil.copytree(artifacts[1], bad)
    (bad / "embeddings.safetensors").write_bytes(b"garbage")
    stop = threading.Event()
    failures: list[str] = []
    seen: set[str] = set()

    def client_loop() -> int:
        n = 0
        with httpx.Client(base_url=base, timeout=10) as client:
            while not stop.is_set():
                r = client.post("/v1/predict", json={"instances": [EXAMPLE] * 4})
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")
                else:
                    seen.add(r.json()["model_version"])
                n += 1
        return n

    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(client_loop) for _ in range(4)]
            with httpx.Client(base_url=base, timeout=30) as admin:
                for i in range(6):
                    target = str(artifacts[(i + 1) % 2]) if i != 3 else str(bad)
                    r = admin.post("/admin/reload", json={"artifact": target}, headers=ADMIN)
                    assert r.status_code == (409 if i == 3 else 200), r.text
                    time.sleep(0.2)
            stop.set()
            total = sum(f.result() for f in futures)
    finally:
        stop.set()
        server.should_exit = True
        thread.join(timeout=10)
    assert not failures, failures[:3]
    assert total >= 50 and seen == versions


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--port", "99999"], "--port (PEP_SERVE_PORT): 99999 is not a TCP port"),
        (["--port", "0"], "--port (PEP_SERVE_PORT): must be at least 1"),
        (["--max-instances", "0"], "--max-instances (PEP_SERVE_MAX_INSTANCES): must be at least 1"),
    ],
)
def test_serve_bad_settings_are_one_error_line(tmp_path, capsys, flags, message):
    """Refused with the flag before the artifact is read (the artifact here does not even exist)."""
    from pep_torchrec import cli

    assert cli.main(["serve", "--artifact", str(tmp_path / "none"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err


def test_serve_bad_env_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("PEP_SERVE_PORT", "80x")
    with pytest.raises(ConfigError, match=r"PEP_SERVE_PORT='80x': expected an integer"):
        Settings.from_env(artifact="a")


def test_admin_reload_is_locked_down(artifacts, synthetic_data, tmp_path_factory):  # noqa: F811
    """No admin token configured: no reload route. With one: 401 without it or with a wrong one,
    403 for an artifact outside the root, 409 for other input fields unless forced; responses name
    no filesystem path; /metrics counts every status."""
    with TestClient(create_app(Settings(artifact=str(artifacts[0])))) as client:
        assert client.post("/admin/reload").status_code == 404
        assert "artifact" not in client.get("/readyz").json()
    other_root = tmp_path_factory.mktemp("other")
    other = other_root / "synthetic_artifact"
    ArtifactConverter(make_run(other_root, synthetic_data, stage="retrain", model="fm", dim=8)).convert(other)
    root = os.path.commonpath([other, artifacts[0]])
    with TestClient(
        create_app(
            Settings(artifact=str(artifacts[0]), admin_token=TOKEN, artifact_root=str(artifacts[0].parent))
        )
    ) as client:
        assert client.post("/admin/reload").status_code == 401
        assert client.post("/admin/reload", headers={"authorization": "Bearer wrong"}).status_code == 401
        r = client.post("/admin/reload", json={"artifact": str(other)}, headers=ADMIN)
        assert r.status_code == 403 and str(other) not in r.text
        assert (
            client.post("/admin/reload", json={"artifact": str(artifacts[1])}, headers=ADMIN).status_code
            == 200
        )
        metrics = client.get("/metrics").text
        assert 'status="401"' in metrics and 'status="403"' in metrics
    with TestClient(
        create_app(Settings(artifact=str(artifacts[0]), admin_token=TOKEN, artifact_root=root))
    ) as client:
        version = client.get("/readyz").json()["model_version"]
        r = client.post("/admin/reload", json={"artifact": str(other)}, headers=ADMIN)
        detail = r.json()["detail"][0]
        assert r.status_code == 409 and detail["type"] == "schema_change" and "removed" in detail["msg"]
        assert root not in r.text and client.get("/readyz").json()["model_version"] == version
        r = client.post("/admin/reload", json={"artifact": str(other), "force": True}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["model_version"] != version
        client.post("/v1/predict", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
        metrics = client.get("/metrics").text
        for status in ("409", "200", "413"):  # the body limit's 413 included
            assert f'status="{status}"' in metrics, status


def test_predict_before_a_model_is_loaded_is_503(artifacts):
    app = create_app(Settings(artifact=str(artifacts[0])))
    with TestClient(app, raise_server_exceptions=False) as client:
        app.state.holder.current = None  # as between the port binding and the first load
        r = client.post("/v1/predict", json={"instances": [EXAMPLE]})
        assert r.status_code == 503 and r.json()["detail"][0]["type"] == "not_ready"


def test_int_fields_take_the_whole_int64_range(artifacts):
    """-2^63 and 2^63 - 1 are ids like any other (unknown → OOV); one past either end is a 422."""
    predictor = Predictor.from_path(artifacts[0])
    for edge in (-(2**63), 2**63 - 1):
        assert len(predictor.predict([{**EXAMPLE, "user_id": edge}])) == 1
    for outside in (-(2**63) - 1, 2**63):
        with pytest.raises(RequestError, match="int64 range"):
            predictor.predict([{**EXAMPLE, "user_id": outside}])


def _answer(response: httpx.Response) -> tuple[int, str | None, bytes]:
    return response.status_code, response.headers.get("content-type"), response.content


def _counters(metrics: str) -> list[str]:
    """The /metrics lines that do not depend on timing: request counts, batch sizes, reloads."""
    return [
        line
        for line in metrics.splitlines()
        if not line.startswith(("pep_request_latency_seconds", 'pep_requests_total{path="/metrics"'))
    ]


@pytest.mark.parametrize("inline_max", [64, 0], ids=["inline", "thread_pool"])
def test_fast_path_answers_exactly_like_the_regular_route(artifacts, monkeypatch, inline_max):
    """POST /v1/predict through the fast path and through FastAPI's route: the same status, content
    type and bytes for valid and malformed requests alike, the same counts in /metrics; and valid
    requests really are answered by the fast path."""
    from pep_torchrec.serving import app as app_module

    monkeypatch.setattr(app_module._FastPredict, "inline_max", inline_max)
    fast_calls: list[int] = []
    original = app_module._FastPredict._predict

    def spy(predictor, instances):
        fast_calls.append(len(instances))
        return original(predictor, instances)

    monkeypatch.setattr(app_module._FastPredict, "_predict", staticmethod(spy))
    json_type = {"content-type": "application/json"}
    valid = [
        {"instances": [EXAMPLE]},
        {"instances": [EXAMPLE, dict(EXAMPLE, user_id=10**9, zip="nowhere", genres=[])]},
        {"instances": [dict(EXAMPLE, user_id=-(2**63), genres=["Drama", "x", "Comedy"])] * 4},
    ]
    bodies = [json.dumps(b).encode() for b in valid] + [
        json.dumps(b).encode()
        for b in [
            {"instances": [dict(EXAMPLE, bogus=1)]},
            {"instances": [dict(EXAMPLE, age="49")]},
            {"instances": [dict(EXAMPLE, age=True)]},
            {"instances": [dict(EXAMPLE, user_id=2**63)]},
            {"instances": [dict(EXAMPLE, user_id=1.5)]},
            {"instances": [dict(EXAMPLE, gender=None)]},
            {"instances": [dict(EXAMPLE, zip="9" * 100_000)]},
            {"instances": [dict(EXAMPLE, genres="Comedy")]},
            {"instances": [dict(EXAMPLE, genres=["Comedy", 3])]},
            {"instances": [{k: v for k, v in EXAMPLE.items() if k != "zip"}]},
            {"instances": [EXAMPLE, 5, "x"]},
            {"instances": [EXAMPLE] * 5},
            {"instances": []},
            {"instances": EXAMPLE},
            {"instances": [EXAMPLE], "extra": 1},
            {"rows": [EXAMPLE]},
            [EXAMPLE],
            None,
        ]
    ]
    bodies += [b"", b"{", b"\xff\xfe", b'{"instances": [' * 50, b'{"instances": [NaN]}', b" " * 5000]
    requests = [(b, json_type) for b in bodies]
    requests += [(bodies[0], {}), (bodies[0], {"content-type": "text/plain"})]
    requests += [(bodies[0], {"content-type": "application/json; charset=utf-8"})]
    settings_ = Settings(artifact=str(artifacts[0]), max_instances=4, max_body_bytes=4096)
    with (
        TestClient(create_app(settings_), raise_server_exceptions=False) as fast,
        TestClient(create_app(settings_, fast_predict=False), raise_server_exceptions=False) as regular,
    ):
        for body, headers in requests:
            got = _answer(fast.post("/v1/predict", content=body, headers=headers))
            want = _answer(regular.post("/v1/predict", content=body, headers=headers))
            assert got == want, (body[:200], headers)
        assert sorted(fast_calls[: len(valid)]) == sorted(len(b["instances"]) for b in valid)
        for client in (fast, regular):  # no model yet: 503 for a valid body, 422 for a bad one
            client.app.state.holder.current = None
        for body in (bodies[0], bodies[len(valid)]):
            got = _answer(fast.post("/v1/predict", content=body, headers=json_type))
            assert got == _answer(regular.post("/v1/predict", content=body, headers=json_type))
        assert _counters(fast.get("/metrics").text) == _counters(regular.get("/metrics").text)
    counts = [line for line in _counters(fast.get("/metrics").text) if line.startswith("pep_requests_total")]
    assert any('status="200"} 4' in line for line in counts), counts  # the valid ones, and charset=
    assert any('status="413"' in line for line in counts) and any('status="503"' in line for line in counts)


def test_fast_path_fuzz_matches_the_regular_route(artifacts):
    """Generated bodies (valid, half-valid, garbage): both paths give the same bytes."""
    settings_ = Settings(artifact=str(artifacts[0]), max_instances=4)
    with (
        TestClient(create_app(settings_), raise_server_exceptions=False) as fast,
        TestClient(create_app(settings_, fast_predict=False), raise_server_exceptions=False) as regular,
    ):

        @settings(
            max_examples=300,
            deadline=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(body=_body)
        def check(body):
            content = json.dumps(body)
            headers = {"content-type": "application/json"}
            got = _answer(fast.post("/v1/predict", content=content, headers=headers))
            assert got == _answer(regular.post("/v1/predict", content=content, headers=headers)), content

        check()


_column_values = (
    _json
    | st.integers(-(2**64), 2**64)
    | st.floats()
    | st.sampled_from(["x" * MAX_VALUE_CHARS, "x" * (MAX_VALUE_CHARS + 1), [0] * 1025, ["a"] * 1024])
    | st.lists(st.integers(-(2**64), 2**64) | st.text(max_size=3) | st.none() | st.booleans(), max_size=3)
)


@settings(max_examples=1000, deadline=None, derandomize=True)
@given(
    ftype=st.sampled_from(["int", "string", "number", "string_list", "int_list"]),
    nullable=st.booleans(),
    column=st.lists(_column_values, max_size=5),
)
def test_column_checks_pass_only_what_the_value_checks_pass(ftype, nullable, column):
    """The predictor's whole-column shortcut may send a valid column to the full checks, but never
    lets through a value they would refuse (which would turn a 422 into a 200 or a 500)."""
    from pep_torchrec.serving.predictor import _check_value, _column_valid

    if _column_valid(ftype, nullable, column):
        for value in column:
            _check_value(ftype, nullable, value, ["instances", 0, "f"])  # raises if refused
