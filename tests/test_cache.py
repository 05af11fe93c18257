"""A lab-proof model cache: many processes and users at once, interruptions, a full disk.

Concurrency tests start real Python processes that ask for the same missing entries at the
same moment (a file barrier per round); the read-only and full-disk tests mount a real
read-only or 8 MB file system in a user namespace (`unshare`), so no root is needed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sft_helpers import models
from sft_helpers.models import (
    WARM_COMMAND,
    CacheError,
    cache_is_valid,
    cache_problems,
    cached_entry,
    entry_path,
    work_folders,
)

PROCESSES = 4
ROUNDS = 3
TIMEOUT_S = 300
# What every worker process runs: for each round, wait until all have arrived, then ask for
# the round's entries in a fresh cache, and print one JSON line: the SHA-256 of each entry's
# manifest as that process found it (a REPORT line). Every build appends its name to builds.log.
# argv: base folder, processes, "toy" or "tiny", then "locks" or "no-locks" for each round.
WORKER = r"""
import hashlib, json, os, sys, time
from pathlib import Path
from sft_helpers import models

base, processes, entries, rounds = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
flock = models.fcntl

def counted(name, build):
    def run(folder):
        with open(base / "builds.log", "a") as log:
            log.write(f"{os.environ['SFT_CACHE_DIR']} {name}\n")
        build(folder)
    return run

def toy_build(folder):  # like safetensors: mode 0600, written in pieces
    (folder / "shards").mkdir()
    fd = os.open(folder / "shards" / "weights.bin", os.O_WRONLY | os.O_CREAT, 0o600)
    for _ in range(5):
        os.write(fd, os.urandom(20_000))  # each builder's copy differs
        time.sleep(0.05)
    os.close(fd)

if entries == "tiny":  # count the real builds
    from sft_helpers import training
    build_adapter = training._build_adapter
    training._build_adapter = lambda *a: counted("adapter", build_adapter(*a))
    models._build_tokenizer = counted("tokenizer", models._build_tokenizer)
    models.BUILDERS["tiny"] = counted("tiny", models.BUILDERS["tiny"])

def ask():
    if entries == "toy":
        return [models.cached_entry("toy", counted("toy", toy_build))]
    adapter = training.course_adapter(profile="tiny", max_length=96, max_steps=1,
                                      batch_size=2, layers=None)
    return [models.tokenizer_dir(), models.profile_dir("tiny"), adapter]

for round_, locks in enumerate(rounds):
    models.fcntl = flock if locks == "locks" else None  # as on a file system without flock
    os.environ["SFT_CACHE_DIR"] = str(base / f"round-{round_}")
    barrier = base / f"barrier-{round_}"
    barrier.mkdir(exist_ok=True)
    (barrier / str(os.getpid())).touch()
    while len(list(barrier.iterdir())) < processes:
        time.sleep(0.01)
    found = {p.name: hashlib.sha256((p / "manifest.json").read_bytes()).hexdigest()
             for p in ask()}
    print("REPORT", json.dumps({"round": round_, "manifests": found}), flush=True)
"""


@pytest.fixture
def lab_cache(monkeypatch):
    """An SFT_CACHE_DIR that other users could reach (pytest's tmp_path sits in a private
    folder), holding copies (0644) of the tokenizer and tiny entries; deleted afterwards."""
    entries = [models.tokenizer_dir(), models.profile_dir("tiny")]
    root = Path(tempfile.mkdtemp(prefix="sft-cache-test-"))
    root.chmod(0o755)
    for entry in entries:
        shutil.copytree(entry, root / "models" / entry.name, copy_function=shutil.copyfile)
    (root / "models").chmod(0o755)
    monkeypatch.setenv("SFT_CACHE_DIR", str(root))
    yield root
    shutil.rmtree(root)


def start_at_once(base: Path, entries: str, rounds: list[str],
                  processes: int = PROCESSES) -> list[subprocess.Popen]:
    """`processes` workers that ask for `entries` in each round, with or without locks."""
    base.mkdir(parents=True, exist_ok=True)
    args = [str(base), str(processes), entries, *rounds]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return [subprocess.Popen([sys.executable, "-c", WORKER, *args], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(processes)]


def reports(workers: list[subprocess.Popen]) -> list[dict]:
    """Every worker's JSON lines, after checking that each exited cleanly."""
    found = []
    for worker in workers:
        out, err = worker.communicate(timeout=TIMEOUT_S)
        assert worker.returncode == 0 and "Traceback" not in err, err
        found += [json.loads(line.removeprefix("REPORT ")) for line in out.splitlines()
                  if line.startswith("REPORT ")]
    return found


def builds(base: Path) -> list[str]:
    log = base / "builds.log"
    return log.read_text().splitlines() if log.exists() else []


def modes(folder: Path) -> set[tuple[str, str]]:
    """(kind, mode) of `folder` and everything under it, e.g. {("dir", "0755")}."""
    return {("dir" if p.is_dir() else "file", f"{stat.S_IMODE(p.stat().st_mode):04o}")
            for p in (folder, *folder.rglob("*"))}


def assert_shared_and_clean(cache: Path) -> None:
    """Every entry of `cache` is valid and readable by all users, and no staging remains."""
    entries = [p for p in (cache / "models").iterdir() if not p.name.startswith(".")]
    assert entries
    for entry in entries:
        assert cache_is_valid(entry), entry
        assert modes(entry) <= {("dir", "0755"), ("file", "0644")}, (entry, modes(entry))
        assert not work_folders(entry)


def test_processes_asking_for_one_missing_entry_at_once_all_read_one_verified_copy(tmp_path):
    rounds = ["locks"] * ROUNDS + ["no-locks"] * ROUNDS
    found = reports(start_at_once(tmp_path, "toy", rounds))
    assert len(found) == PROCESSES * len(rounds)
    for round_, locks in enumerate(rounds):
        cache = tmp_path / f"round-{round_}"
        final = hashlib.sha256((cache / "models/toy/manifest.json").read_bytes()).hexdigest()
        seen = {r["manifests"]["toy"] for r in found if r["round"] == round_}
        assert seen == {final}, "every process read the copy that stayed in place"
        assert_shared_and_clean(cache)
        built = [line for line in builds(tmp_path) if line.startswith(f"{cache} ")]
        if locks == "locks":  # the others waited on the lock instead of building it too
            assert len(built) == 1, built
        else:  # each builds; the rename race's losers use the winner's copy
            assert len(built) >= 1


@pytest.mark.slow  # 4 processes x 2 rounds of tokenizer, tiny model and adapter (~70 s)
def test_processes_building_the_tiny_profile_and_an_adapter_at_once_build_each_once(tmp_path):
    rounds = ["locks", "locks"]
    found = reports(start_at_once(tmp_path, "tiny", rounds))
    assert len(found) == PROCESSES * len(rounds)
    for round_ in range(len(rounds)):
        cache = tmp_path / f"round-{round_}"
        assert len({json.dumps(r["manifests"]) for r in found if r["round"] == round_}) == 1
        assert_shared_and_clean(cache)
        built = sorted(line.split()[1] for line in builds(tmp_path) if line.startswith(f"{cache} "))
        assert built == ["adapter", "tiny", "tokenizer"]


@pytest.mark.slow  # 3 processes build the 540 MB default model, then `check` loads it
def test_processes_building_the_default_model_at_once_leave_a_cache_that_check_passes(
        lab_cache):
    script = "from sft_helpers.models import load_model; load_model('tiny'); load_model()"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    workers = [subprocess.Popen([sys.executable, "-c", script], env=env, text=True,
                                stderr=subprocess.PIPE) for _ in range(3)]
    errors = [worker.communicate(timeout=TIMEOUT_S)[1] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0, 0], errors
    waiting = f"waiting for another process to finish building {lab_cache / 'models'}"
    assert any(waiting in err for err in errors), "the others waited for the one build"
    assert_shared_and_clean(lab_cache)
    check = run_check(env)
    assert check.returncode == 0 and "ready for a lab" in check.stdout, check.stdout
    assert "default model: loads in" in check.stdout


def run_check(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sft_helpers.models", "check"], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def test_check_exits_non_zero_naming_missing_entries_changed_bytes_and_private_files(
        fresh_cache):
    tokenizer = fresh_cache / models.TOKENIZER_ENTRY
    with open(tokenizer / "tokenizer.json", "r+b") as f:
        f.seek(100)
        f.write(b"#")
    (tokenizer / "chat_template.jinja").chmod(0o600)
    check = run_check({**os.environ, "HF_HUB_OFFLINE": "1"})
    assert check.returncode == 1
    for named in (f"{fresh_cache / 'tiny'}: missing; build it with `{WARM_COMMAND}`",
                  f"{tokenizer / 'tokenizer.json'}: its SHA-256 differs",
                  f"{tokenizer / 'chat_template.jinja'}: mode 0600, other users cannot read it",
                  "versions: "):
        assert named in check.stdout, check.stdout


def write_toy(folder: Path) -> None:
    (folder / "weights.bin").write_bytes(b"\x01" * 1000)


def test_cache_problems_are_none_for_a_healthy_cache_and_name_each_damaged_file(lab_cache):
    entry = cached_entry("toy", write_toy)
    assert cache_problems(required=("toy",)) == []
    (entry / "weights.bin").write_bytes(b"\x02" * 1000)  # same size, other bytes
    (entry / models.MANIFEST).chmod(0o600)
    assert cache_problems(required=("toy", "absent")) == [
        f"{entry_path('absent')}: missing; build it with `{WARM_COMMAND}`",
        f"{entry / 'weights.bin'}: its SHA-256 differs from the manifest (a changed or damaged "
        "file)",
        f"{entry / models.MANIFEST}: mode 0600, other users cannot read it (fix: chmod -R a+rX "
        f"{lab_cache})",
    ]


def test_entries_are_readable_by_every_user_whatever_the_umask(tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_CACHE_DIR", str(tmp_path / "cache"))

    def private_build(folder: Path) -> None:  # what safetensors and a 077 umask do
        (folder / "sub").mkdir()
        os.close(os.open(folder / "sub" / "weights.bin", os.O_WRONLY | os.O_CREAT, 0o600))

    old = os.umask(0o077)
    try:
        entry = cached_entry("toy", private_build)
    finally:
        os.umask(old)
    assert modes(entry) == {("dir", "0755"), ("file", "0644")}
    assert modes(entry.parent.parent) >= {("dir", "0755")}
    assert f"{stat.S_IMODE(entry.with_name('.toy.lock').stat().st_mode):04o}" == "0644"
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o755


def test_a_build_killed_mid_write_leaves_no_entry_and_the_next_build_cleans_up(
        tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_CACHE_DIR", str(tmp_path))
    started = tmp_path / "started"
    script = (
        "import time\nfrom pathlib import Path\nfrom sft_helpers.models import cached_entry\n"
        "def build(folder):\n"
        "    (folder / 'weights.bin').write_bytes(b'half')\n"
        f"    Path({str(started)!r}).touch()\n"
        "    time.sleep(60)\n"
        "cached_entry('toy', build)\n"
    )
    worker = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ))
    deadline = time.monotonic() + 60
    while not started.exists() and worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started.exists(), "the build never started"
    worker.send_signal(signal.SIGKILL)  # a killed kernel: no finally clause runs
    worker.wait()
    entry = entry_path("toy")
    assert not entry.exists() and not cache_is_valid(entry)
    assert [p.name for p in work_folders(entry)] == [f".toy.building-{worker.pid}"]
    assert "left by an interrupted build" in " ".join(cache_problems(required=()))
    assert cache_is_valid(cached_entry("toy", write_toy))
    assert work_folders(entry) == []


def test_an_interrupted_rebuild_keeps_nothing_partial(tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_CACHE_DIR", str(tmp_path))
    entry = cached_entry("toy", write_toy)

    def interrupted(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_entry("toy", interrupted, rebuild=True)
    assert cache_is_valid(entry) and (entry / "weights.bin").read_bytes() == b"\x01" * 1000
    assert work_folders(entry) == []


def test_rebuild_replaces_a_valid_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_CACHE_DIR", str(tmp_path))
    entry = cached_entry("toy", write_toy)
    cached_entry("toy", lambda folder: (folder / "other.bin").write_bytes(b"new"), rebuild=True)
    assert cache_is_valid(entry) and sorted(p.name for p in entry.iterdir()) == [
        models.MANIFEST, "other.bin"]
    assert work_folders(entry) == []


def test_a_build_that_fills_the_disk_names_the_folder_and_the_space_it_needs(
        tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_CACHE_DIR", str(tmp_path))

    def disk_fills(folder: Path) -> None:  # a writer that hits ENOSPC after 2 MB
        (folder / "weights.bin").write_bytes(b"\x00" * 2_000_000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(CacheError) as error:
        cached_entry("course-adapter-0123", disk_fills)
    message = str(error.value)
    assert f"cache folder {tmp_path / 'models'}" in message
    assert "needs more than 2 MB" in message and "SFT_CACHE_DIR" in message
    assert not entry_path("course-adapter-0123").exists()
    assert work_folders(entry_path("course-adapter-0123")) == []


def unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "--user", "--map-root-user", "--mount", "true"]
    return subprocess.run(probe, capture_output=True).returncode == 0


needs_mounts = pytest.mark.skipif(
    not unshare_works(), reason="mounting a read-only or a small file system without root "
    "needs user namespaces (unshare --user --mount)")


def run_with_mount(mount: str, folder: Path, script: str) -> subprocess.CompletedProcess:
    """Run `script` in a new user and mount namespace where `mount` ("$0" is `folder`) has
    been run first: the mount is seen by that process only, and gone when it ends."""
    command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
               f'{mount} && exec "$1" -c "$2"', str(folder), sys.executable, script]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@needs_mounts
def test_a_read_only_cache_loads_and_a_missing_entry_names_the_folder_and_the_command(
        lab_cache):
    models_folder = lab_cache / "models"  # the teacher warmed only the tiny profile
    before = sorted((str(p), p.stat().st_mtime_ns) for p in models_folder.rglob("*"))
    student = (
        "from sft_helpers import models\n"
        "model, tokenizer = models.load_model('tiny')\n"
        "print('loaded', model.config.num_hidden_layers, len(tokenizer))\n"
        "try:\n    models.load_model()\n"
        "except models.CacheError as error:\n    print('CacheError:', error)\n"
    )
    run = run_with_mount('mount --bind -o ro "$0" "$0"', lab_cache, student)
    assert run.returncode == 0, run.stderr
    assert "loaded 2 " in run.stdout
    assert f"cache folder {models_folder} (another user's, or a read-only cache)" in run.stdout
    assert f"SFT_CACHE_DIR={lab_cache} {WARM_COMMAND}" in run.stdout
    assert sorted((str(p), p.stat().st_mtime_ns) for p in models_folder.rglob("*")) == before


@needs_mounts
def test_a_really_full_disk_raises_a_cache_error_and_leaves_nothing_partial(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    tokenizer = models.tokenizer_dir()
    fill = (f'mount -t tmpfs -o size=8m tmpfs "$0" && mkdir "$0/models" && '
            f'cp -r {tokenizer} "$0/models/"')  # 3.5 MB of tokenizer: 13 MB of weights won't fit
    script = (
        "import os\nfrom sft_helpers import models\n"
        f"os.environ['SFT_CACHE_DIR'] = {str(cache)!r}\n"
        "try:\n    models.load_model('tiny')\n"
        "except models.CacheError as error:\n    print('CacheError:', error)\n"
        "print('left:', sorted(os.listdir(models.entry_path('tiny').parent)))\n"
    )
    run = run_with_mount(fill, cache, script)
    assert run.returncode == 0, run.stderr
    assert f"no space left on the disk of the cache folder {cache / 'models'}" in run.stdout
    assert "entry 'tiny' needs about 17 MB" in run.stdout
    assert "left: ['.tiny.lock', 'tokenizer']" in run.stdout
