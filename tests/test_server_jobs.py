"""The job store (SQLite, WAL) on its own, and the rule that a network listener needs a password."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from brushwork.request import BrushworkError, GenerationRequest
from brushwork.server.app import check_bind, is_loopback
from brushwork.server.store import CANCELLED, DONE, QUEUED, RUNNING, JobStore


def _request(prompt: str = "a red circle") -> dict:
    return GenerationRequest(prompt=prompt, steps=2, width=32, height=32).to_dict()


def test_jobs_run_in_order_and_a_reopened_store_still_has_them(tmp_path):
    store = JobStore(tmp_path / "db.sqlite3")
    first, second = store.create(_request("one")), store.create(_request("two"))
    assert store.queue_position(first.id) == 1 and store.queue_position(second.id) == 2
    claimed = store.claim_next()
    assert claimed.id == first.id and claimed.status == RUNNING
    assert store.queue_position(second.id) == 1
    store.finish(first.id, DONE, result={"images": []})
    store.close()

    reopened = JobStore(tmp_path / "db.sqlite3")
    assert reopened.get(first.id).status == DONE
    assert reopened.get(second.id).status == QUEUED
    assert reopened.get(second.id).request["prompt"] == "two"
    mode = sqlite3.connect(tmp_path / "db.sqlite3").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode.lower() == "wal"


def test_a_job_left_running_by_a_crash_is_queued_again_unless_it_was_being_cancelled(tmp_path):
    store = JobStore(tmp_path / "db.sqlite3")
    crashed, cancelling = store.create(_request("crashed")), store.create(_request("cancelling"))
    store.claim_next()
    store.claim_next()
    store.mark_cancel_requested(cancelling.id)
    store.close()  # the process dies here

    store = JobStore(tmp_path / "db.sqlite3")
    assert store.recover() == 1
    assert store.get(crashed.id).status == QUEUED
    assert store.get(cancelling.id).status == CANCELLED
    assert store.claim_next().id == crashed.id


def test_only_a_queued_job_can_be_cancelled_from_the_queue(tmp_path):
    store = JobStore(tmp_path / "db.sqlite3")
    job = store.create(_request())
    assert store.cancel_queued(job.id)
    assert store.get(job.id).status == CANCELLED
    assert store.claim_next() is None  # a cancelled job never runs
    assert not store.cancel_queued(job.id)


def test_uploaded_images_are_kept_apart_from_the_request_and_come_back_for_the_run(tmp_path):
    from PIL import Image

    store = JobStore(tmp_path / "db.sqlite3")
    request = GenerationRequest(prompt="p", mode="img2img", init_image=Image.new("RGB", (16, 16), "red")).to_dict()
    job = store.create(request)
    assert store.get(job.id).request["init_image"] == "<image>"  # listings stay small
    assert store.list()[0].request["init_image"] == "<image>"
    claimed = store.claim_next()
    again = GenerationRequest.from_dict(claimed.request)
    assert again.init_image.size == (16, 16) and again.init_image.getpixel((0, 0)) == (255, 0, 0)
    store.finish(job.id, DONE, result={})
    assert store.get(job.id, with_inputs=True).request["init_image"] == "<image>"  # not kept once done


def test_history_search_matches_every_word_and_treats_wildcards_literally(tmp_path):
    store = JobStore(tmp_path / "db.sqlite3")
    for i, prompt in enumerate(["a red cat", "a blue cat on a mat", "a dog", "100% orange"]):
        store.add_image(job_id="j", idx=i, path=f"{i}.png", request={"prompt": prompt}, seed=i, width=32,
                        height=32, model="tiny", model_hash=None, infotext=prompt)
    assert [r["prompt"] for r in store.search_images("cat")] == ["a blue cat on a mat", "a red cat"]
    assert [r["prompt"] for r in store.search_images("CAT mat")] == ["a blue cat on a mat"]
    assert [r["prompt"] for r in store.search_images("%")] == ["100% orange"]
    assert len(store.search_images("")) == 4
    assert store.search_images("_") == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_hosts_need_no_password(host):
    assert is_loopback(host)
    check_bind(host, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "example.com"])
def test_listening_on_a_network_without_a_password_is_refused(host):
    assert not is_loopback(host)
    with pytest.raises(BrushworkError, match="--auth"):
        check_bind(host, None)
    check_bind(host, "user:secret")


def test_serve_command_refuses_a_network_address_without_auth_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "brushwork.cli", "serve", "--host", "0.0.0.0", "--port", "7999"],
        capture_output=True, text=True, timeout=60, env={"BRUSHWORK_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "--auth" in lines[0] and "0.0.0.0" in lines[0]


def _image_row(idx: int, path: str) -> dict:
    return {"idx": idx, "path": path, "request": {"prompt": "p"}, "seed": idx, "width": 32, "height": 32,
            "model": "tiny", "model_hash": None, "infotext": "p"}


def test_a_jobs_images_and_its_end_are_one_transaction(tmp_path):
    from PIL import Image

    store = JobStore(tmp_path / "db.sqlite3")
    request = GenerationRequest(prompt="p", mode="img2img", init_image=Image.new("RGB", (16, 16), "red")).to_dict()
    job = store.create(request)
    store.claim_next()
    broken = {k: v for k, v in _image_row(1, "txt2img/00001-1.png").items() if k != "seed"}
    with pytest.raises(TypeError):  # fails after the first image's row went in: all of it is undone
        store.finish_done(job.id, [_image_row(0, "txt2img/00000-0.png"), broken], {"images": [{}, {}]})
    assert store.search_images() == [] and store.status(job.id) == RUNNING
    assert store.get(job.id, with_inputs=True).request["init_image"] != "<image>"

    result = {"images": [{"path": "txt2img/00000-0.png"}, {"path": "txt2img/00001-1.png"}]}
    ids = store.finish_done(job.id, [_image_row(0, "txt2img/00000-0.png"), _image_row(1, "txt2img/00001-1.png")],
                            result)
    done = store.get(job.id, with_inputs=True)
    assert done.status == DONE and done.progress == 1.0 and done.request["init_image"] == "<image>"
    assert [i["id"] for i in done.result["images"]] == ids
    assert sorted(r["id"] for r in store.search_images()) == sorted(ids)


def test_files_a_killed_run_left_are_removed_at_start_so_its_rerun_records_them_once(tmp_path):
    import os
    import time

    from brushwork.output.files import write_atomic, write_linked
    from brushwork.server.app import DB_NAME, create_app
    from brushwork.settings import Settings

    settings = Settings(home=tmp_path / "home", models_dir=tmp_path / "models", outputs_dir=tmp_path / "outputs")
    store = JobStore(settings.data_dir / DB_NAME)
    killed, recorded = store.create(_request("killed")), store.create(_request("recorded"))
    store.claim_next()
    store.claim_next()
    folder = settings.outputs_dir / "txt2img"
    earlier = write_atomic(b"an earlier picture", folder, lambda n: f"{n:05d}-1.png")
    # the killed run: one picture written (and linked), one killed before its link; nothing on record
    lost, lost_tmp = write_linked(b"killed run", folder, lambda n: f"{n:05d}-2.png", tag=killed.id)
    unlinked = folder / f".tmp-{killed.id}-half.png"
    unlinked.write_bytes(b"half")
    # the recorded job: on record, killed before it removed its tmp
    kept, kept_tmp = write_linked(b"recorded", folder, lambda n: f"{n:05d}-3.png", tag=recorded.id)
    store.finish_done(recorded.id, [_image_row(0, "txt2img/" + kept.name)], {"images": [{}]})
    old_cli, new_cli = folder / ".tmp-oldcli1.png", folder / ".tmp-newcli1.png"
    old_cli.write_bytes(b"x")
    new_cli.write_bytes(b"x")  # the command line may be writing it right now
    os.utime(old_cli, (time.time() - 7200, time.time() - 7200))
    thumbs = settings.data_dir / "thumbs"
    thumbs.mkdir(parents=True)
    (thumbs / "tmpab12cd.webp").write_bytes(b"x")
    (thumbs / "5.webp").write_bytes(b"x")
    assert os.stat(lost).st_nlink == 2
    store.close()  # kill -9 here

    app = create_app(object(), settings, start_worker=False)
    try:
        assert app.state.brushwork.store.status(killed.id) == QUEUED  # runs again, and writes its picture anew
        assert app.state.brushwork.store.status(recorded.id) == DONE
    finally:
        app.state.brushwork.store.close()
    assert sorted(p.name for p in folder.iterdir()) == sorted([earlier.name, kept.name, new_cli.name])
    assert not lost.exists() and not lost_tmp.exists() and not unlinked.exists() and not kept_tmp.exists()
    assert kept.read_bytes() == b"recorded" and os.stat(kept).st_nlink == 1
    assert sorted(p.name for p in thumbs.iterdir()) == ["5.webp"]


def test_a_run_that_finds_its_job_recorded_by_another_run_leaves_no_files(tmp_path):
    """A restarted SQLite server queues a running job again while a replica still runs it: the run that finishes
    second finds the job on record, and its pictures go; the history keeps the first run's, once."""
    from brushwork import Engine, Settings
    from brushwork.server.worker import Worker

    outputs = tmp_path / "outputs"
    store = JobStore(tmp_path / "db.sqlite3")
    job = store.create(_request())
    first_run = "txt2img/00000-1.png"  # what the other run wrote and recorded
    (outputs / "txt2img").mkdir(parents=True)
    (outputs / first_run).write_bytes(b"the first run's picture")

    class RecordedMeanwhile(Engine):
        def generate(self, *args, **kwargs):
            out = super().generate(*args, **kwargs)
            other = JobStore(tmp_path / "db.sqlite3")  # the other run, through its own connection
            other.finish_done(job.id, [_image_row(0, first_run)], {"images": [{"path": first_run}]})
            other.close()
            return out

    worker = Worker(store, RecordedMeanwhile(Settings(home=tmp_path / "home")), outputs)
    worker.run_job(store.claim_next())
    assert store.status(job.id) == DONE
    assert sorted(str(p.relative_to(outputs)) for p in outputs.rglob("*.png")) == [first_run]
    assert not list(outputs.rglob(".tmp-*"))
    assert [row["path"] for row in store.search_images()] == [first_run]
    assert store.get(job.id).result == {"images": [{"path": first_run, "id": store.search_images()[0]["id"]}]}
