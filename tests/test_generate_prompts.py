"""`latentloom generate --prompts FILE --output-dir DIR`: the file's checks, the seed and naming rule,
resume, per-line overrides, 2 processes under `accelerate launch` equal to 1, and a killed run."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from latentloom.cli import main as cli_main
from latentloom.pipelines.metadata import read_metadata
from latentloom.pipelines.prompts_file import read_prompts

FAST = ["--steps", "2", "--height", "16", "--width", "16", "--dtype", "fp32", "--threads", "1", "--no-progress"]
PROMPTS = "a red circle\n# a comment\n\na blue square\n  a green star  \n"


def run(folder, prompts, out, *extra):
    return cli_main(["generate", "--model", str(folder), "--prompts", str(prompts), "--output-dir", str(out),
                     *FAST, *extra])


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS)
    return path


# ---------------------------------------------------------------- the file
def test_plain_text_skips_blank_lines_and_comments(prompts):
    entries = read_prompts(prompts)
    assert [(e.index, e.line, e.prompt) for e in entries] == [(0, 1, "a red circle"), (1, 4, "a blue square"),
                                                                (2, 5, "a green star")]


def test_jsonl_lines_carry_overrides(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "seed": 3, "guidance_scale": 2}\n\n{"prompt": "b", "negative_prompt": null}\n')
    entries = read_prompts(path)
    assert [(e.prompt, e.overrides, e.line) for e in entries] == [("a", {"seed": 3, "guidance_scale": 2}, 1),
                                                                   ("b", {"negative_prompt": None}, 3)]


@pytest.mark.parametrize("text, message", [
    ("", "holds no prompts"),
    ("# only a comment\n\n", "holds no prompts"),
])
def test_a_file_without_prompts_is_refused(tmp_path, text, message):
    path = tmp_path / "p.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_prompts(path)


@pytest.mark.parametrize("line, message", [
    ('["a"]', "line 2 must be a JSON object"),
    ("{not json", "line 2 is not valid JSON"),
    ('{"prompt": "a", "steps": 3}', r"line 2: unknown key\(s\) \['steps'\]"),
    ('{"seed": 1}', 'line 2: "prompt" must be a non-empty string'),
    ('{"prompt": "a", "seed": -1}', "line 2: 'seed' must be an integer >= 0, got -1"),
    ('{"prompt": "a", "seed": true}', "line 2: 'seed' must be an integer >= 0, got True"),
    ('{"prompt": "a", "num_inference_steps": 0}', "line 2: 'num_inference_steps' must be an integer >= 1"),
    ('{"prompt": "a", "guidance_scale": "high"}', "line 2: 'guidance_scale' must be a number >= 0"),
    ('{"prompt": "a", "height": 16.5}', "line 2: 'height' must be an integer"),
    ('{"prompt": "a", "sampler": 3}', "line 2: 'sampler' must be a sampler name"),
    ('{"prompt": "a", "negative_prompt": 1}', "line 2: 'negative_prompt' must be a string or null"),
])
def test_a_bad_jsonl_line_is_named(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_prompts(path)


def test_a_missing_file_or_a_folder_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="is a folder"):
        read_prompts(tmp_path)


# ---------------------------------------------------------------- the command's errors, before any image
@pytest.mark.parametrize("argv, message", [
    (["--prompts", "{prompts}"], "--prompts FILE and --output-dir DIR go together"),
    (["--output-dir", "{out}"], "--prompts FILE and --output-dir DIR go together"),
    (["--prompts", "{prompts}", "--output-dir", "{out}", "-o", "x.png"], "--output names one image"),
    (["a prompt", "--prompts", "{prompts}", "--output-dir", "{out}"], "give no PROMPT"),
    (["--prompts", "{prompts}", "--output-dir", "{file}"], "is a file, not a folder"),
    (["--prompts", "{tmp}/missing.txt", "--output-dir", "{out}"], "does not exist"),
    (["--prompts", "{bad_sampler}", "--output-dir", "{out}"], "line 1: unknown sampler 'eulerr'"),
    (["a prompt", "--overwrite"], "--overwrite goes with --prompts"),
])
def test_bad_commands_fail_before_any_image(folder, prompts, tmp_path, capsys, argv, message):
    (tmp_path / "file").write_text("x")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "sampler": "eulerr"}\n')
    names = dict(prompts=prompts, out=tmp_path / "out", file=tmp_path / "file", tmp=tmp_path,
                 bad_sampler=tmp_path / "bad.jsonl")
    argv = [a.format(**names) for a in argv]
    assert cli_main(["generate", "--model", str(folder), *argv, *FAST]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.png"))


# ---------------------------------------------------------------- one process
def test_names_seeds_recipes_and_manifest(folder, pipe, prompts, tmp_path):
    out = tmp_path / "out"
    assert run(folder, prompts, out, "--seed", "100", "--num-images", "2", "--guidance", "3") == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["000000-1.png", "000000.png", "000001-1.png", "000001.png", "000002-1.png", "000002.png"]
    # entry n, image i: seed 100 + n * 2 + i, the same image as made alone with that seed
    recipe = read_metadata(out / "000001-1.png")
    assert (recipe["prompt"], recipe["seed"], recipe["guidance_scale"]) == ("a blue square", 103, 3.0)
    alone = pipe("a blue square", seed=103, num_inference_steps=2, guidance_scale=3.0, height=16, width=16,
                 progress=False).images[0]
    assert np.array_equal(pixels(out / "000001-1.png"), np.asarray(alone))
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(m["line"], m["file"], m["seed"]) for m in manifest] == [
        (0, "000000.png", 100), (0, "000000-1.png", 101), (1, "000001.png", 102), (1, "000001-1.png", 103),
        (2, "000002.png", 104), (2, "000002-1.png", 105)]
    import hashlib

    assert manifest[3]["sha256"] == hashlib.sha256((out / "000001-1.png").read_bytes()).hexdigest()
    assert len((out / "manifest-rank0.jsonl").read_text().splitlines()) == 6
    assert json.loads((out / "run.json").read_text())["seed"] == 100


def test_a_rerun_skips_what_is_done_and_refuses_other_options(folder, prompts, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(folder, prompts, out) == 0  # no --seed: one is drawn and kept in run.json
    seed = json.loads((out / "run.json").read_text())["seed"]
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    capsys.readouterr()
    assert run(folder, prompts, out) == 0
    assert "0 made now" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == stamps
    assert json.loads((out / "run.json").read_text())["seed"] == seed
    (out / "000001.png").unlink()  # one missing: only it is made, with the kept seed
    assert run(folder, prompts, out) == 0
    assert read_metadata(out / "000001.png")["seed"] == seed + 1
    assert "1 made now" in capsys.readouterr().err
    assert run(folder, prompts, out, "--steps", "3") == 2
    assert "000000.png was made with other options (num_inference_steps is 2 there, 3 in this run)" in \
        capsys.readouterr().err
    assert run(folder, prompts, out, "--steps", "3", "--overwrite") == 0
    assert all(read_metadata(p)["num_inference_steps"] == 3 for p in out.glob("*.png"))


def test_jsonl_overrides_are_applied_and_recorded(folder, pipe, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a red circle"}\n'
                    '{"prompt": "a blue square", "seed": 9, "num_inference_steps": 3, "guidance_scale": 2.5, '
                    '"height": 24, "width": 8, "sampler": "euler_a", "negative_prompt": "blurry"}\n')
    out = tmp_path / "out"
    assert run(folder, path, out, "--seed", "5") == 0
    first, second = read_metadata(out / "000000.png"), read_metadata(out / "000001.png")
    assert (first["seed"], first["num_inference_steps"], first["height"]) == (5, 2, 16)
    assert {k: second[k] for k in ("seed", "num_inference_steps", "guidance_scale", "height", "width", "sampler",
                                   "negative_prompt")} == {
        "seed": 9, "num_inference_steps": 3, "guidance_scale": 2.5, "height": 24, "width": 8, "sampler": "euler_a",
        "negative_prompt": "blurry"}
    alone = pipe("a blue square", seed=9, num_inference_steps=3, guidance_scale=2.5, height=24, width=8,
                 sampler="euler_a", negative_prompt="blurry", progress=False).images[0]
    assert np.array_equal(pixels(out / "000001.png"), np.asarray(alone))


# ---------------------------------------------------------------- several processes, and a killed run
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}


def command(folder, prompts, out, *extra):
    return ["-m", "latentloom", "generate", "--model", str(folder), "--prompts", str(prompts), "--output-dir", str(out),
            *FAST, *extra]


def test_two_processes_make_the_images_one_makes(folder, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"shape number {n}" for n in range(7)) + "\n")
    one, two = tmp_path / "one", tmp_path / "two"
    done = subprocess.run([sys.executable, *command(folder, prompts, one, "--seed", "3")], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]
    done = subprocess.run([*launch, *command(folder, prompts, two, "--seed", "3")], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "7 images in" in done.stderr and "by 2 processes" in done.stderr
    names = sorted(p.name for p in one.glob("*.png"))
    assert names == sorted(p.name for p in two.glob("*.png")) and len(names) == 7
    for name in names:
        assert np.array_equal(pixels(one / name), pixels(two / name)), name
    assert (one / "manifest.jsonl").read_text() == (two / "manifest.jsonl").read_text()
    ranks = [(two / f"manifest-rank{r}.jsonl").read_text().splitlines() for r in (0, 1)]
    assert sorted(json.loads(x)["file"] for x in ranks[0] + ranks[1]) == names  # each image made once
    # a rerun of the two-process command has nothing left to do
    done = subprocess.run([*launch[:-1], str(free_port()), *command(folder, prompts, two, "--seed", "3")], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "0 made now" in done.stderr, done.stderr[-3000:]


def test_a_killed_run_resumes_with_every_image_once(folder, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"shape number {n}" for n in range(30)) + "\n")
    out = tmp_path / "out"
    slow = command(folder, prompts, out, "--seed", "1")
    slow[slow.index("--steps") + 1] = "6"
    proc = subprocess.Popen([sys.executable, *slow], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while len(list(out.glob("0*.png"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    made = sorted(out.glob("0*.png"))
    assert 3 <= len(made) < 30, "the run was not killed in the middle"
    for path in made:  # every image under its final name is whole
        assert read_metadata(path)["prompt"].startswith("shape number")
    done = subprocess.run([sys.executable, *slow], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{30 - len(made)} made now" in done.stderr
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == [f"{n:06d}.png" for n in range(30)]
    assert not list(out.glob(".*.tmp"))  # a write the kill cut short is cleaned up
    manifest = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m["line"] for m in manifest] == list(range(30))
