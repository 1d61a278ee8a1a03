"""`onellm batch` run as people run it: a folder of point clouds and a prompt made into a batch,
submitted and followed to its end, its results read back; against the session's live gateway."""

import json
import subprocess
import sys

import media
from client_helpers import REPO, clean_env

PROMPT = "Describe this 3-D shape"


def onellm_batch(gateway: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", "batch", "--url", gateway, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=clean_env())


def test_from_folder_submits_follows_and_reads_back_each_file(gateway, tmp_path):
    clouds = tmp_path / "clouds"
    clouds.mkdir()
    for seed, ext in enumerate(("ply", "obj", "glb")):
        (clouds / f"shape{seed}.{ext}").write_bytes(media.point(ext, seed=900 + seed))

    made = onellm_batch(gateway, "from-folder", str(clouds), "--prompt", PROMPT, "--max-tokens", "2")

    assert made.returncode == 0, made.stderr
    batch_id = made.stdout.strip()
    assert batch_id.startswith("batch_")
    progress = made.stderr.strip().splitlines()  # not a terminal: each update on a line of its own
    assert progress[-1].startswith("[####################] 3/3") and progress[-1].endswith("completed")
    out = tmp_path / "results.jsonl"
    read = onellm_batch(gateway, "results", batch_id, "--out", str(out))
    assert read.returncode == 0, read.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == ["shape0.ply", "shape1.obj", "shape2.glb"]
    assert all(line["response"]["status_code"] == 200 for line in lines)
    status = onellm_batch(gateway, "status", batch_id)
    assert status.returncode == 0 and status.stdout.startswith("[####################] 3/3")


def test_submit_reports_the_lines_of_a_bad_file(gateway, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'
                   '{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n')
    done = onellm_batch(gateway, "submit", str(bad))
    assert done.returncode == 1
    assert "failed" in done.stderr and "line 2: " in done.stderr and "custom_id" in done.stderr


def test_an_array_needs_its_modality(gateway, tmp_path):
    (tmp_path / "scan.npy").write_bytes(media.fmri("npy"))
    done = onellm_batch(gateway, "from-folder", str(tmp_path), "--prompt", PROMPT)
    assert done.returncode == 2 and "--modality" in done.stderr
    lines = tmp_path / "lines.jsonl"
    done = onellm_batch(gateway, "from-folder", str(tmp_path), "--prompt", PROMPT, "--modality", "fmri",
                        "--out", str(lines))
    assert done.returncode == 0, done.stderr
    part = json.loads(lines.read_text())["body"]["messages"][0]["content"][0]
    assert part["type"] == "input_fmri" and part["input_fmri"]["file_id"].startswith("file-")
