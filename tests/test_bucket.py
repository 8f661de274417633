"""The pictures in an S3-compatible bucket (setting ``outputs_bucket``; output/bucket.py), against a real object store
(OpenStack Swift's s3api, ``s3server.py``): a job's pictures are in the bucket before they are on record, another
machine that shares no folder serves them from there, names never collide, and a bad or unreachable bucket is one
clear line, never a picture on record that the bucket lacks."""

from __future__ import annotations

import uuid

import pytest

from brushwork.output.bucket import BucketError, parse_url
from brushwork.request import BrushworkError
from brushwork.settings import Settings
from s3server import s3_env, s3_server  # noqa: F401
from serverkit import make_home, make_settings, tiny_model_file  # noqa: F401

pytest.importorskip("boto3", reason="boto3 is not installed: pip install 'brushwork[s3]'")


def _bucket(server) -> str:
    name = f"pics-{uuid.uuid4().hex[:10]}"
    server.client().create_bucket(Bucket=name)
    return name


def _keys(server, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in server.client().list_objects_v2(Bucket=bucket).get("Contents", []))


def _app(paths, **overrides):
    from brushwork.engine.core import Engine
    from brushwork.server.app import create_app

    settings = make_settings(paths, **overrides)
    return create_app(Engine(settings), settings)


def test_pictures_go_to_the_bucket_and_a_machine_without_them_serves_them_from_there(  # noqa: F811
        s3_env, tiny_model_file, tmp_path):  # noqa: F811
    from fastapi.testclient import TestClient

    from brushwork.engine.core import Engine
    from brushwork.server.app import create_app

    bucket = _bucket(s3_env)
    shared = dict(outputs_bucket=f"s3://{bucket}/studio", outputs_bucket_endpoint=s3_env.endpoint,
                  database_url=None)
    paths = make_home(tmp_path / "a", tiny_model_file)
    settings = make_settings(paths, **shared)
    with TestClient(create_app(Engine(settings), settings)) as client:
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "seed": 3, "width": 32, "height": 32,
                                                   "steps": 2, "batch_size": 2})
        assert r.status_code == 200, r.text
        job = client.get("/api/v1/jobs").json()["jobs"][0]
        images = client.get("/api/v1/images").json()["images"]
    assert len(images) == 2
    files = sorted(image["file"] for image in images)
    # relative paths in the history; each name ends in the job's id, so machines numbering apart never collide
    assert all(f.startswith("txt2img/") and f.endswith(f"-{job['id'][:12]}.png") for f in files), files
    assert _keys(s3_env, bucket) == [f"studio/{f}" for f in files]
    for f in files:
        stored = s3_env.client().get_object(Bucket=bucket, Key=f"studio/{f}")["Body"].read()
        assert stored == (paths["outputs"] / f).read_bytes()

    client.app.state.brushwork.store.close()
    # another machine: the same job history (here the same SQLite file; a cluster's PostgreSQL), an outputs folder
    # of its own without those pictures
    elsewhere = {**paths, "outputs": tmp_path / "b" / "outputs"}
    settings_b = make_settings(elsewhere, **shared)
    with TestClient(create_app(Engine(settings_b), settings_b, start_worker=False)) as client_b:
        for image in images:
            picture = client_b.get(image["url"])
            assert picture.status_code == 200
            assert picture.content == (paths["outputs"] / image["file"]).read_bytes()
            thumb = client_b.get(f"{image['url']}/thumb")
            assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/webp"
        assert not (elsewhere["outputs"] / files[0]).exists()  # read into the cache, not into its outputs
        assert (paths["home"] / "cache" / "bucket" / files[0]).is_file()


def test_a_picture_the_bucket_refuses_is_not_on_record_and_the_job_says_why(  # noqa: F811
        s3_env, tiny_model_file, tmp_path):  # noqa: F811
    from fastapi.testclient import TestClient

    bucket = _bucket(s3_env)
    paths = make_home(tmp_path, tiny_model_file)
    app = _app(paths, outputs_bucket=f"s3://{bucket}", outputs_bucket_endpoint=s3_env.endpoint)
    s3_env.client().delete_bucket(Bucket=bucket)  # gone after the server checked it: the upload fails
    with TestClient(app) as client:
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "seed": 3, "width": 32, "height": 32,
                                                   "steps": 2})
        assert r.status_code == 500, r.text  # the server's storage failed, not the request
        assert r.json()["detail"].startswith("could not store txt2img/") and r.json()["detail"].endswith(
            f".png in s3://{bucket} (NoSuchBucket: The specified bucket does not exist.)"), r.text
        assert client.get("/api/v1/images").json()["images"] == []
        assert client.get("/api/v1/status").status_code == 200  # still serving
    assert not list(paths["outputs"].rglob("*.png"))  # no picture left that the history does not name


def test_an_unreachable_bucket_or_bad_credentials_stop_the_server_at_start_with_one_line(
        s3_env, tiny_model_file, tmp_path, monkeypatch):  # noqa: F811
    paths = make_home(tmp_path, tiny_model_file)
    missing = f"pics-{uuid.uuid4().hex[:10]}"
    with pytest.raises(BucketError, match=rf"the pictures' bucket s3://{missing} at http://127.0.0.1:\d+ cannot be "
                                          r"used \(404: Not Found\); check outputs_bucket"):
        _app(paths, outputs_bucket=f"s3://{missing}", outputs_bucket_endpoint=s3_env.endpoint)
    bucket = _bucket(s3_env)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(BucketError, match=r"cannot be used \(403: Forbidden\); .*AWS_\* credentials"):
        _app(paths, outputs_bucket=f"s3://{bucket}", outputs_bucket_endpoint=s3_env.endpoint)


@pytest.mark.parametrize(("url", "ok"), [("s3://pics", ("pics", "")), ("s3://my.pics-1/a/b/", ("my.pics-1", "a/b")),
                                         ("pics", None), ("s3://Pics", None), ("s3://pics/../up", None),
                                         ("http://pics", None), ("s3://p", None)])
def test_the_bucket_url_is_checked_once_as_it_comes_in(url, ok, tmp_path, monkeypatch):
    if ok is not None:
        assert parse_url(url) == ok
        assert Settings.load(home=tmp_path, outputs_bucket=url).outputs_bucket == url
        return
    monkeypatch.setenv("BRUSHWORK_OUTPUTS_BUCKET", url)
    with pytest.raises(BrushworkError, match="setting outputs_bucket must be s3://bucket or s3://bucket/prefix .*; "
                                             "fix BRUSHWORK_OUTPUTS_BUCKET"):
        Settings.load(home=tmp_path)


def test_a_bad_endpoint_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("BRUSHWORK_OUTPUTS_BUCKET_ENDPOINT", "minio:9000")
    with pytest.raises(BrushworkError, match="setting outputs_bucket_endpoint must be an http:// or https:// URL, "
                                             "got 'minio:9000'"):
        Settings.load(home=tmp_path)
