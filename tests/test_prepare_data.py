"""scripts/prepare_data.py with no network: a file:// mirror laid out like raw.githubusercontent.com
(<owner>/<repo>/<commit>/<path>), built from ../shared/data itself, and a Hugging Face cache folder that
huggingface_hub's own hf_hub_download reads with local_files_only."""
import functools
import http.server
import os
import threading
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import prepare_data as prep

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SMALL = ["medqa", "truthfulqa"]  # 6 files, 3.8 MB


@pytest.fixture
def shared():
    if not (DATA / "SHA256SUMS").exists():
        pytest.skip(f"no offline data copy at {DATA}")
    return DATA


def mirror(root: Path, entries=prep.MANIFEST) -> str:
    """A GitHub-raw layout of symlinks into ../shared/data; returns its file:// base URL."""
    for e in entries:
        p = root / e.repo / e.commit / e.path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.symlink_to(DATA / e.dest)
    return root.as_uri()


def run_cli(*args, timeout=60):
    """`python scripts/prepare_data.py ...` as a user runs it."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}  # a library's deprecation warning is not our error line
    return subprocess.run([sys.executable, str(ROOT / "scripts/prepare_data.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def one_line_error(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    return lines[0]


def test_manifest_is_the_offline_copy(shared):
    """Every file of ../shared/data (but its README) is in the manifest, with the same sha256."""
    assert prep.sha256sums() == (shared / "SHA256SUMS").read_text()
    on_disk = {str(p.relative_to(shared)) for p in shared.rglob("*") if p.is_file()} - {"README.md", "SHA256SUMS"}
    assert on_disk == {e.dest for e in prep.MANIFEST}
    licenses = {e.dest for e in prep.MANIFEST if Path(e.dest).name.startswith("LICENSE.")}
    assert {e.license for e in prep.MANIFEST} <= licenses  # every file names a license file we fetch


def test_every_file_lands_byte_identical(shared, tmp_path):
    out = tmp_path / "data"
    assert prep.prepare(out, base_url=mirror(tmp_path / "gh"))[0] == len(prep.MANIFEST)
    for e in prep.MANIFEST:
        assert (out / e.dest).read_bytes() == (shared / e.dest).read_bytes(), e.dest
    assert (out / "SHA256SUMS").read_bytes() == (shared / "SHA256SUMS").read_bytes()
    readme = (out / "README.md").read_text()
    assert all(e.url() in readme for e in prep.MANIFEST)
    assert not list(out.rglob("*.part"))


def test_rerun_is_a_no_op(shared, tmp_path):
    out = tmp_path / "data"
    prep.prepare(out, SMALL, mirror(tmp_path / "gh"))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    # an unreachable source proves nothing is fetched again
    n = sum(e.set in SMALL for e in prep.MANIFEST)
    assert prep.prepare(out, SMALL, (tmp_path / "nowhere").as_uri()) == (0, 0, n)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_only_fetches_the_named_sets(shared, tmp_path):
    out = tmp_path / "data"
    prep.prepare(out, ["medqa"], mirror(tmp_path / "gh"))
    got = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert got == ["README.md", "SHA256SUMS", "medqa/LICENSE.jind11-MedQA", "medqa/test.jsonl"]


def test_tampered_source_is_rejected(shared, tmp_path):
    entry = next(e for e in prep.MANIFEST if e.dest == "medqa/test.jsonl")
    base = mirror(tmp_path / "gh", [e for e in prep.MANIFEST if e.set == "medqa"])
    src = tmp_path / "gh" / entry.repo / entry.commit / entry.path
    src.unlink()
    src.write_bytes((shared / entry.dest).read_bytes().replace(b"step1", b"step2", 1))
    out = tmp_path / "data"
    with pytest.raises(prep.UserError, match="medqa/test.jsonl: sha256 .* not the manifest's") as e:
        prep.prepare(out, ["medqa"], base)
    assert "\n" not in str(e.value) and src.as_uri() in str(e.value)
    assert not (out / entry.dest).exists() and not list(out.rglob("*.part"))


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_mirror_and_http_errors(shared, tmp_path):
    """The same urllib path over real HTTP (a loopback server on the mirror): a 200 lands, a 404 is one line."""
    mirror(tmp_path / "gh", [e for e in prep.MANIFEST if e.set == "medqa"])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(QuietHandler, directory=tmp_path / "gh"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        out = tmp_path / "data"
        assert prep.prepare(out, ["medqa"], base)[0] == 2
        assert (out / "medqa/test.jsonl").read_bytes() == (shared / "medqa/test.jsonl").read_bytes()
        with pytest.raises(prep.UserError, match=r"could not fetch http://127.*/LICENSE \(HTTP 404 .*--base_url"):
            prep.prepare(tmp_path / "other", ["gsm8k"], base)
    finally:
        server.shutdown()
        server.server_close()


def test_tampered_local_file_is_rejected(shared, tmp_path):
    out = tmp_path / "data"
    base = mirror(tmp_path / "gh")
    prep.prepare(out, ["medqa"], base)
    (out / "medqa/test.jsonl").write_bytes(b"{}\n")
    with pytest.raises(prep.UserError, match="test.jsonl is there but its sha256"):
        prep.prepare(out, ["medqa"], base)
    assert (out / "medqa/test.jsonl").read_bytes() == b"{}\n"  # a user's file is never overwritten


def test_cli_errors_are_one_line(shared, tmp_path):
    err = one_line_error(run_cli("--only", "gsm8k", "mmlu", "--out", tmp_path / "data"))
    assert "unknown data set mmlu" in err and "gsm8k, longbench" in err
    nowhere = (tmp_path / "nowhere").as_uri()
    err = one_line_error(run_cli("--only", "medqa", "--out", tmp_path / "data", "--base_url", nowhere))
    assert f"could not fetch {nowhere}/" in err and "--base_url" in err
    r = run_cli("--only", "medqa", "--out", tmp_path / "data", "--base_url", mirror(tmp_path / "gh"))
    assert r.returncode == 0 and "2 files fetched" in r.stdout, r.stderr
    (tmp_path / "data/medqa/test.jsonl").write_bytes(b"{}\n")
    assert "medqa/test.jsonl is there but" in one_line_error(run_cli("--only", "medqa", "--out", tmp_path / "data"))


def test_no_torch():
    r = subprocess.run([sys.executable, "-c", "import sys, prepare_data; assert 'torch' not in sys.modules"],
                       cwd=ROOT / "scripts", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def hub_cache(root: Path, repo_id: str, files: dict) -> Path:
    """A Hugging Face cache folder (as huggingface_hub lays it out) holding one revision of a dataset repo."""
    commit = "0" * 40
    repo = root / f"datasets--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / prep.HUB_REVISION).write_text(commit)
    for name, data in files.items():
        (repo / "snapshots" / commit / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / commit / name).write_bytes(data)
    return root


def zip_bytes(tmp_path: Path, members: dict) -> bytes:
    with zipfile.ZipFile(tmp_path / "made.zip", "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return (tmp_path / "made.zip").read_bytes()


def test_unzip_member_takes_one_member_byte_for_byte(tmp_path):
    jsonl = b'{"input": "", "context": "caf\xc3\xa9\\n", "answers": ["x"]}\r\n{"_id": "2"}\n'
    (tmp_path / "data.zip").write_bytes(zip_bytes(tmp_path, {"data/multi_news.jsonl": jsonl,
                                                             "data/multi_news_e.jsonl": b"other\n"}))
    prep.unzip_member(tmp_path / "data.zip", "data/multi_news.jsonl", tmp_path / "out.jsonl")
    assert (tmp_path / "out.jsonl").read_bytes() == jsonl
    with pytest.raises(prep.UserError, match="has no member data/qasper.jsonl"):
        prep.unzip_member(tmp_path / "data.zip", "data/qasper.jsonl", tmp_path / "out.jsonl")
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(prep.UserError, match="not a readable zip"):
        prep.unzip_member(tmp_path / "bad.zip", "data/multi_news.jsonl", tmp_path / "out.jsonl")


def test_hub_source(shared, tmp_path):
    """--source hub: multi_news.jsonl out of the hub's data.zip through huggingface_hub's own download
    function (cache only), the rest of the set from the GitHub mirror."""
    hub_download = pytest.importorskip("huggingface_hub").hf_hub_download
    repo_id, filename, member = prep.HUB["longbench/multi_news.jsonl"]
    archive = zip_bytes(tmp_path, {member: (shared / "longbench/multi_news.jsonl").read_bytes(),
                                   "data/qasper.jsonl": b"{}\n"})
    cache = hub_cache(tmp_path / "hf", repo_id, {filename: archive})
    local = functools.partial(hub_download, cache_dir=cache, local_files_only=True)
    gh = [e for e in prep.MANIFEST if e.set == "longbench" and e.dest not in prep.HUB]  # no GitHub copy of it
    out = tmp_path / "data"
    prep.main(["--only", "longbench", "--source", "hub", "--out", str(out), "--base_url", mirror(tmp_path / "gh", gh)],
            hub_download=local)
    for e in prep.MANIFEST:
        if e.set == "longbench":
            assert (out / e.dest).read_bytes() == (shared / e.dest).read_bytes(), e.dest
    (out / "longbench/multi_news.jsonl").unlink()
    empty = functools.partial(hub_download, cache_dir=tmp_path / "empty", local_files_only=True)
    with pytest.raises(prep.UserError, match=f"could not fetch data.zip of the hub dataset {repo_id}"):
        prep.main(["--only", "longbench", "--source", "hub", "--out", str(out)], hub_download=empty)
