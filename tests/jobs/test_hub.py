"""The sink as a Hugging Face dataset: the card that makes `datasets.load_dataset(SINK)` read the shards
with their features (a pandas categorical source column included), the card's masked config and the
keys a user adds to it, the sink's survey knowing the card, and `restyle push` against a stand-in Hub
server on 127.0.0.1 that answers the calls `upload_folder` makes."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from jobs.commits import SinkError, SinkState, survey
from jobs.config import validate_config
from jobs.hub import CARD_MARKER, HubError, dataset_card, front_matter, push, write_card
from jobs.schema import features, output_type, yaml_features
from operators.storage import filesystem_for
from tests.conftest import png_bytes

CONFIGS = [{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}]


@pytest.fixture(scope="module")
def finished_sink(ray_session, tmp_path_factory):
    """A finished job's sink (3 rows, shards of 2 rows, image files) over a Parquet source that pandas
    wrote with a categorical column, a nullable integer column and a string column."""
    from jobs.pipeline import run_job

    root = tmp_path_factory.mktemp("hub")
    (root / "source").mkdir()
    frame = pd.DataFrame(
        {
            "id": ["a", "b", "c"],
            "image": [png_bytes(12, 10, (200, 0, 0)), png_bytes(12, 10, (0, 200, 0)), png_bytes(12, 10, (0, 0, 200))],
            "label": pd.Categorical(["cat", "dog", "cat"]),
            "count": pd.array([1, None, 3], dtype="Int64"),
            "caption": pd.array(["red", None, "blue"], dtype="string"),
        }
    )
    frame.to_parquet(root / "source" / "rows.parquet")
    assert pa.types.is_dictionary(pq.read_schema(root / "source" / "rows.parquet").field("label").type)
    config = validate_config(
        {
            "source": {"uri": str(root / "source")},
            "operators": [{"kind": "standardize", "steps": [{"op": "normalize"}], "output_mode": "rgb"}],
            "sink": {"uri": str(root / "out"), "rows_per_shard": 2, "write_images": True},
        }
    )
    result = run_job(config)
    assert (result.summary["ok"], result.summary["rows_out"]) == (3, 3)
    return config, root / "out", result.summary


def test_load_dataset_reads_the_sink_folder_with_its_features(finished_sink, tmp_path):
    import datasets

    _, sink, _ = finished_sink

    # The folder path alone: without the card `datasets` would pick `imagefolder` (images/ has more files).
    loaded = datasets.load_dataset(str(sink), split="train", cache_dir=str(tmp_path / "hf"))

    assert loaded.num_rows == 3
    assert loaded.features["image"] == datasets.Image()
    assert (loaded.features["label"], loaded.features["count"]) == (datasets.Value("string"), datasets.Value("int64"))
    rows = {row["id"]: row for row in loaded}
    assert sorted(rows) == ["a", "b", "c"]
    assert [(rows[key]["label"], rows[key]["count"], rows[key]["caption"]) for key in "abc"] == [
        ("cat", 1, "red"),
        ("dog", None, None),
        ("cat", 3, "blue"),
    ]
    assert rows["b"]["image"].size == (12, 10)
    assert rows["b"]["image"].getpixel((0, 0)) == (0, 255, 0)  # normalize stretches to full range
    matter = front_matter((sink / "README.md").read_text())
    assert matter["configs"] == CONFIGS
    assert {"name": "image", "dtype": "image"} in matter["dataset_info"]["features"]
    assert {"name": "label", "dtype": "string"} in matter["dataset_info"]["features"]
    assert loaded.features == datasets.Features._from_yaml_list(matter["dataset_info"]["features"])


def test_the_card_is_restyles_own_in_the_sinks_survey(finished_sink, tmp_path):
    _, sink, _ = finished_sink
    filesystem, root = filesystem_for(str(sink), {})
    ours, foreign = survey(filesystem, root)
    assert foreign == []
    assert f"{root}/README.md" in ours

    other = tmp_path / "other"
    other.mkdir()
    (other / "README.md").write_text("# my notes\n")
    assert survey(*filesystem_for(str(other), {}))[1] == ["README.md"]


def test_overwrite_deletes_restyles_card_and_refuses_a_users_readme(tmp_path):
    from jobs.commits import config_hash
    from jobs.pipeline import open_sink
    from tests.jobs.test_sink_safety import files, image_folder, job

    source, sink = image_folder(tmp_path / "in"), tmp_path / "out"
    sink.mkdir()
    (sink / "_manifest.json").write_text("{}")
    (sink / "README.md").write_text(f"---\nlicense: mit\n---\n{CARD_MARKER}\n")
    config = job(source, sink, mode="overwrite")
    state, lease = open_sink(config, config_hash(config), "run00001")
    lease.release()
    assert files(sink) == set()

    (sink / "README.md").write_text("# my notes\n")
    with pytest.raises(SinkError, match=r"holds files restyle did not write \(1 entries: README.md\)"):
        open_sink(config, config_hash(config), "run00002")
    assert files(sink) == {"README.md"}


def test_a_rewritten_card_keeps_the_users_keys_and_never_replaces_a_foreign_readme(finished_sink, tmp_path):
    import shutil

    config, sink, summary = finished_sink
    copy = tmp_path / "out"
    shutil.copytree(sink, copy)
    config = config.model_copy(update={"sink": config.sink.model_copy(update={"uri": str(copy)})})
    text = (copy / "README.md").read_text()
    (copy / "README.md").write_text(text.replace("---\n", "---\nlicense: mit\ntags:\n- restyle\nconfigs: []\n", 1))

    write_card(config, summary, SinkState(config.sink))

    matter = front_matter((copy / "README.md").read_text())
    assert list(matter)[:2] == ["license", "tags"]
    assert (matter["license"], matter["tags"], matter["configs"]) == ("mit", ["restyle"], CONFIGS)

    (copy / "README.md").write_text("# my own card\n")
    assert write_card(config, summary, SinkState(config.sink)) is None
    assert (copy / "README.md").read_text() == "# my own card\n"


def test_the_card_shows_the_config_with_every_credential_masked():
    config = validate_config(
        {
            "source": {
                "uri": "s3://bucket/in",
                "storage": {"access_key_id": "AKIASOURCEKEY", "secret_access_key": "source-secret-value"},
            },
            "operators": [{"kind": "standardize", "name": "tidy", "steps": [{"op": "normalize"}]}],
            "sink": {"uri": "s3://bucket/out", "storage": {"session_token": "sink-session-token"}},
        }
    )
    summary = {"rows_in": 4, "rows_out": 4, "ok": 3, "error": 1, "rejected": 0, "config_hash": "0123abcd"}

    card = dataset_card(config, summary, {"id": {"dtype": "string", "_type": "Value"}})

    for secret in ("AKIASOURCEKEY", "source-secret-value", "sink-session-token"):
        assert secret not in card
    assert card.count("'**********'") == 3
    assert "| output rows | 4 (3 ok, 1 error, 0 rejected) |" in card
    assert "| config hash | `0123abcd` |" in card
    assert "1. `tidy` (standardize), 1 variant(s) per row" in card
    assert CARD_MARKER in card
    body_config = yaml.safe_load(card.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert body_config["sink"]["uri"] == "s3://bucket/out"
    assert front_matter(card) == {
        "configs": CONFIGS,
        "dataset_info": {"features": [{"name": "id", "dtype": "string"}]},
    }


POINT = pa.struct([("x", pa.int32()), ("label", pa.string())])


@pytest.mark.parametrize(
    "data_type",
    [
        pa.int8(),
        pa.string(),
        pa.timestamp("us", tz="Europe/Paris"),
        pa.decimal128(9, 2),
        pa.list_(pa.int32()),
        pa.list_(pa.float32(), 3),
        pa.large_list(pa.string()),
        pa.list_(POINT),
        pa.list_(pa.list_(pa.int8())),
        POINT,
        pa.struct([("shot", pa.struct([("tags", pa.list_(pa.string(), 2))]))]),
        pa.json_(),
        pa.dictionary(pa.int8(), pa.string()),
    ],
    ids=str,
)
def test_card_features_are_those_datasets_writes(data_type):
    import datasets

    schema = pa.schema([pa.field("value", output_type(data_type, "value"))])
    feature_dict = {**features(schema), "image": {"_type": "Image"}}

    expected = datasets.Features.from_dict(feature_dict)
    assert yaml_features(feature_dict) == expected._to_yaml_list()
    assert datasets.Features._from_yaml_list(yaml_features(feature_dict)) == expected


class StandInHub:
    """The Hub API calls `create_repo` and `upload_folder` make, answered on 127.0.0.1: files are kept
        per repository; every file is uploaded in the commit itself (preupload answers `regular`); the card's
    metadata is recorded where the Hub validates it."""

    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.created: list[dict] = []
        self.validated: list[tuple[str, dict]] = []
        self.tokens: set[str] = set()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, value, status=200):
                body = json.dumps(value).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _repo(self) -> tuple[str, str]:
                # /api/datasets/OWNER/NAME/ACTION/REVISION[...]
                parts = self.path.split("?", 1)[0].split("/") + ["", "", ""]
                return f"{parts[3]}/{parts[4]}", parts[5]

            def do_GET(self):
                hub.tokens.add(self.headers.get("authorization", ""))
                repo, action = self._repo()
                if action != "tree" or repo not in hub.repos:
                    return self._reply({"error": "not found"}, 404)
                files = hub.repos[repo]
                self._reply([{"type": "file", "path": p, "size": len(b), "oid": "0" * 40} for p, b in files.items()])

            def do_POST(self):
                hub.tokens.add(self.headers.get("authorization", ""))
                data = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path == "/api/repos/create":
                    payload = json.loads(data)
                    hub.created.append(payload)
                    repo = f"{payload['organization']}/{payload['name']}"
                    hub.repos.setdefault(repo, {})
                    return self._reply({"url": f"http://{self.headers['host']}/datasets/{repo}"})
                if self.path == "/api/validate-yaml":  # the card's metadata, checked before the upload
                    payload = json.loads(data)
                    hub.validated.append((payload["repoType"], front_matter(payload["content"])))
                    return self._reply({})
                repo, action = self._repo()
                if action == "preupload":
                    paths = [item["path"] for item in json.loads(data)["files"]]
                    return self._reply(
                        {"files": [{"path": p, "uploadMode": "regular", "shouldIgnore": False} for p in paths]}
                    )
                if action == "commit":
                    for line in data.splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            hub.repos[repo][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                        elif item["key"] == "deletedFile":
                            del hub.repos[repo][item["value"]["path"]]
                    oid = "1" * 40
                    url = f"http://{self.headers['host']}/datasets/{repo}/commit/{oid}"
                    return self._reply({"commitUrl": url, "commitOid": oid})
                self._reply({"error": "not found"}, 404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)


@pytest.fixture
def stand_in_hub(monkeypatch):
    from huggingface_hub import constants

    hub = StandInHub()
    hub.thread.start()
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    yield hub
    hub.server.shutdown()
    hub.server.server_close()


def test_push_uploads_the_card_shards_and_images_and_mirrors_them(finished_sink, stand_in_hub, monkeypatch, capsys):
    from jobs.cli import main

    _, sink, _ = finished_sink
    stand_in_hub.repos["me/styled"] = {"data/part-old.parquet": b"stale", "notes.txt": b"kept"}
    monkeypatch.setenv("MY_HUB_TOKEN", "hf_pushtoken")

    assert main(["push", str(sink), "me/styled", "--private", "--token-env", "MY_HUB_TOKEN"]) == 0

    local = {
        path.relative_to(sink).as_posix(): path.read_bytes()
        for pattern in ("README.md", "data/*.parquet", "images/*")
        for path in sink.glob(pattern)
    }
    manifest = json.loads((sink / "_manifest.json").read_text())
    assert sorted(name for name in local if name.startswith("data/")) == [item["shard"] for item in manifest["shards"]]
    assert len([name for name in local if name.startswith("images/")]) == 3
    assert stand_in_hub.repos["me/styled"] == {**local, "notes.txt": b"kept"}
    assert stand_in_hub.created == [
        {"name": "styled", "organization": "me", "visibility": "private", "type": "dataset"}
    ]
    assert stand_in_hub.tokens == {"Bearer hf_pushtoken"}
    assert stand_in_hub.validated == [("dataset", front_matter((sink / "README.md").read_text()))]
    assert f"pushed {len(local)} files to {stand_in_hub.url}/datasets/me/styled" in capsys.readouterr().out


def test_push_refuses_an_unfinished_sink_and_a_missing_token(finished_sink, tmp_path, monkeypatch):
    import shutil

    _, sink, _ = finished_sink
    monkeypatch.delenv("EMPTY_TOKEN", raising=False)
    with pytest.raises(HubError, match="--token-env EMPTY_TOKEN: the variable is not set or is empty"):
        push(str(sink), "me/styled", token_env="EMPTY_TOKEN")
    copy = tmp_path / "out"
    shutil.copytree(sink, copy)
    (copy / "_manifest.json").unlink()
    with pytest.raises(HubError, match="it has no _manifest.json: its job has not finished"):
        push(str(copy), "me/styled")
    with pytest.raises(HubError, match="restyle push reads a local sink; s3://bucket/out is not one"):
        push("s3://bucket/out", "me/styled")
