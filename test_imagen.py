"""Tests for imagen.py, read as its specification. Benchmarks at the end: `make bench`."""

import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import zlib

import pytest

import imagen
from conftest import FAKE_VERSION, HERE, IMAGEN, REPLICATE_TOKEN, free_port, need_tool, poll, write_script
from conftest import LAUNCHER, SHUTDOWN_POLL, FakeClock, popen_imagen


# ===== Helpers: an independent PNG reader =====

def decode_png(data):
    """(width, height, rows of RGB bytes), written from the PNG spec, not from imagen:
    8-bit RGB or palette images, every filter type."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header, palette = 8, b"", None, None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"PLTE":
            palette = [body[i:i + 3] for i in range(0, len(body), 3)]
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and interlace == 0 and (color == 2 or (color == 3 and palette))
    bpp = 3 if color == 2 else 1
    raw = zlib.decompress(idat)
    stride, rows, previous = width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if kind == 2:       # Up, the byte above: no neighbour on the left to wait for
            line = bytearray((x + up) & 255 for x, up in zip(line, previous))
        elif kind in (1, 3, 4):
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                up = previous[i]
                up_left = previous[i - bpp] if i >= bpp else 0
                if kind == 1:
                    line[i] = (line[i] + left) & 255
                elif kind == 3:
                    line[i] = (line[i] + (left + up) // 2) & 255
                else:
                    p = left + up - up_left
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                    pred = left if pa <= pb and pa <= pc else (up if pb <= pc else up_left)
                    line[i] = (line[i] + pred) & 255
        else:
            assert kind == 0, "filter type %d" % kind
        rows.append(bytes(line) if color == 2 else b"".join(map(palette.__getitem__, line)))
        previous = line
    return width, height, rows


def png_text_chunks(data):
    found, pos = {}, 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        found.setdefault(kind, []).append(data[pos + 8:pos + 8 + length])
        pos += 12 + length
    return found


def listing(path):
    """Files under path, leaving out the private HOME (where the ledger lives)."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")
                  if p.is_file() and p.relative_to(path).parts[0] != "home")


# ===== CLI basics =====

def test_version_prints_name_version_and_a_hash_of_the_file(run_main):
    run = run_main("version")
    assert run.code == 0
    assert run.out.startswith("imagen %s (" % imagen.__version__)
    assert run_main("--version").out == run.out


def test_no_command_prints_help_and_exits_2(run_main):
    run = run_main()
    assert run.code == 2 and "generate" in run.err


def test_help_lists_every_command_with_its_summary(cli):
    run = cli("--help")
    assert run.code == 0
    for name, (_, summary, _) in imagen.COMMANDS.items():
        assert "  %-10s %s" % (name, summary) in run.out


def test_unknown_command_is_one_line_naming_the_choices(run_main):
    run = run_main("generat", "x")
    assert run.code == 2 and run.err.count("\n") == 1
    assert run.err.startswith("imagen: argument COMMAND: invalid choice: 'generat'")


def test_config_flag_is_accepted_before_and_after_the_subcommand(run_main, write_config, tmp_path):
    path = write_config("default_backend: mock\n")
    for argv in (["--config", path, "config", "path"], ["config", "path", "--config", path]):
        run = run_main(*argv)
        assert run.code == 0 and run.out.strip() == str(path)


def test_bad_flag_is_one_line_and_exit_2(run_main):
    run = run_main("generate", "x", "--seed", "abc")
    assert run.code == 2
    assert run.err.count("\n") == 1 and run.err.startswith("imagen: generate: ")


def test_a_config_file_named_like_a_command_is_read_as_the_config(run_main, write_config):
    write_config("backends:\n  other:\n    adapter: mock\ndefault_backend: other\n", name="version")
    for argv in (["--config", "version", "generate", "fox"], ["generate", "--config", "version", "fox"],
                 ["generate", "fox", "--config", "version"]):
        run = run_main(*argv + ["--json", "-o", "a.png"])
        assert run.code == 0, (argv, run)
        assert json.loads(run.out)["backend"] == "other"


def test_a_prompt_starting_with_a_dash_follows_a_double_dash(run_main):
    for argv in (["generate", "--", "-dash"], ["generate", "-o", "a.png", "--", "-dash"]):
        run = run_main(*argv[:1] + ["--json"] + argv[1:])
        assert run.code == 0 and json.loads(run.out)["prompt"] == "-dash", run


def test_help_command_prints_the_help_and_exits_0(run_main):
    run = run_main("help")
    assert run.code == 0 and run.err == "" and run.out.startswith("usage: imagen ")
    for name, (_, summary, _) in imagen.COMMANDS.items():
        assert "  %-10s %s" % (name, summary) in run.out
    run = run_main("help", "generate")
    assert run.code == 0 and "--no-preview" in run.out and run.out.startswith("usage: imagen generate")


def every_parser():
    """The parser of each command, built as `imagen COMMAND --help` builds it."""
    for name in imagen.COMMANDS:
        yield name, imagen.command_parser(name)


def test_every_flag_of_every_command_has_a_help_text():
    import argparse
    for name, parser in every_parser():
        for action in parser._actions:
            if action.option_strings and action.help != argparse.SUPPRESS:
                assert action.help, "%s %s has no help text" % (name, action.option_strings[0])


def test_help_builds_no_command_parser(monkeypatch, capsys):
    built = []
    monkeypatch.setattr(imagen, "command_parser", lambda name: built.append(name))
    with pytest.raises(SystemExit):
        imagen.main(["--help"])
    assert built == []


def test_a_plain_command_line_is_read_as_argparse_reads_it():
    plain_lines = (["generate"], ["generate", "x", "--backend", "mock", "--size", "64x64"],
                   ["generate", "-", "--json", "-q", "--no-sidecar", "--config", "c.yaml"],
                   ["generate", "", "--negative", "", "-i", "a.png", "--image", "b.png",
                    "--strength", "0.5", "--seed", " 7", "--count", "3", "--max-cost", "1e-2"],
                   ["generate", "x", "--preview", "--no-preview", "--no-cloud", "-o", "f.png",
                    "--timeout", "2", "--steps", "4", "--style", "s", "--from", "last"],
                   ["edit", "a.png"], ["edit", "a.png", "fox", "--size", "64x64"],
                   ["backends", "--json", "--check"], ["schema"],
                   ["usage", "--since", "2026-01-01", "--raw", "--json", "--local"],
                   ["sync", "--dry-run", "--recheck"], ["url", "f.png", "--expires", "60"],
                   ["inspect", "last"], ["serve"],
                   ["serve", "--addr", ":0", "--client-timeout", "3"],
                   ["batch", "f.txt", "-j", "3", "--dry-run", "--force", "-o", "o.png"], ["mcp"],
                   ["version", "--config", "c.yaml"], ["history"], ["history", "fox"],
                   ["history", "red", "fox", "--json"], ["history", "-"], ["history", ""],
                   ["history", "fox", "--limit", "3", "--since", "7d", "--backend", "mock"],
                   ["history", "--json", "--json", "--limit", " 0"],
                   ["history", "--since", "", "--backend", "a b"])
    for argv in plain_lines:
        plain = imagen.plain_command_args(argv)
        assert plain is not None and vars(plain) == vars(imagen.parse_command_line(argv)[1]), argv
    other_lines = ([], ["gen", "x"], ["--config", "c.yaml", "generate"], ["config", "path"],
                   ["help"], ["generate", "-h"], ["generate", "x", "y"],
                   ["generate", "--size", "64x64", "x"], ["generate", "x", "--size"],
                   ["generate", "x", "--seed", "x"], ["generate", "x", "--seed", "-1"],
                   ["generate", "x", "--si", "64x64"], ["generate", "x", "--size=64x64"],
                   ["generate", "x", "--"], ["generate", "-x"], ["edit"], ["edit", "--json"],
                   ["--config", "c.yaml", "history"], ["history", "--help"],
                   ["history", "--json", "fox"], ["history", "--limit", "x"],
                   ["history", "--limit", "-1"], ["history", "--lim", "3"], ["history", "--"],
                   ["history", "--limit=3"], ["history", "--since"])
    for argv in other_lines:
        assert imagen.plain_command_args(argv) is None, argv
    # every command's declarations went through ArgumentTable
    assert {argv[0] for argv in plain_lines + other_lines if argv} >= set(imagen.COMMANDS)


def test_a_plain_generate_imports_no_argparse(env, tmp_path):
    """argparse, with what it imports, was a third of a mock generate."""
    code = ("import sys, imagen\n"
            "code = imagen.main(['generate', 'x', '--size', '64x64', '-o', %r])\n"
            "print('argparse' in sys.modules, code)\n" % str(tmp_path / "a.png"))
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True,
                         text=True, timeout=60).stdout
    assert out.endswith("False 0\n"), out


# ===== Generate with the mock backend =====

def test_generate_writes_png_and_sidecar_and_prints_the_path(run_main, tmp_path):
    out = tmp_path / "fox.png"
    run = run_main("generate", "a red fox", "--backend", "mock", "--seed", "42", "--output", out)
    assert run.code == 0, run
    assert run.out == "%s\n" % out
    width, height, _ = decode_png(out.read_bytes())
    assert (width, height) == (1024, 1024)
    sidecar = json.loads((tmp_path / "fox.png.json").read_text())
    assert sidecar["seed"] == 42 and sidecar["file"] == "fox.png"


def test_generate_with_no_config_uses_default_naming_under_pictures(run_main, env):
    run = run_main("generate", "A Red Fox!", "--seed", "7")
    assert run.code == 0, run
    path = run.out.strip()
    pictures = os.path.join(env["HOME"], "Pictures", "imagen")
    assert path.startswith(pictures + os.sep)
    relative = os.path.relpath(path, pictures)
    date, name = relative.split(os.sep)
    assert len(date) == 10 and date[4] == "-" and name == "a-red-fox-7.png"


def test_the_quick_start_command_makes_an_image_with_no_config(env, tmp_path):
    # README's first command, as written there: the script itself, no config, no venv
    run = subprocess.run([sys.executable, IMAGEN, "generate", "a red fox in the snow",
                          "--backend", "mock"], env=env, capture_output=True, text=True,
                         timeout=60, cwd=str(tmp_path))
    assert run.returncode == 0 and run.stderr == "", run
    path = run.stdout.strip()
    assert path.startswith(os.path.join(env["HOME"], "Pictures", "imagen") + os.sep)
    assert decode_png(open(path, "rb").read())[:2] == (1024, 1024)
    assert 'python3 imagen.py generate "a red fox in the snow" --backend mock' in \
        open(os.path.join(HERE, "README.md"), encoding="utf-8").read()


def test_mock_is_deterministic_in_prompt_seed_and_size():
    first = imagen.mock_png("a fox", 1, 64, 80)
    assert imagen.mock_png("a fox", 1, 64, 80) == first
    assert imagen.mock_png("a fox", 2, 64, 80) != first
    assert imagen.mock_png("a cat", 1, 64, 80) != first
    assert decode_png(imagen.mock_png("a fox", 1, 96, 64))[:2] == (96, 64)


def test_mock_pixels_differ_for_different_seeds():
    _, _, a = decode_png(imagen.mock_png("p", 1, 64, 64))
    _, _, b = decode_png(imagen.mock_png("p", 2, 64, 64))
    assert a != b


def test_png_round_trip_through_an_independent_reader():
    rows = [bytes((x * 7 + y * 3 + c * 50) & 255 for x in range(37) for c in range(3))
            for y in range(23)]
    scanlines = [bytes([y % 5]) + row for y, row in enumerate(rows)]   # filter types 0..4
    width, height, _ = decode_png(imagen.encode_png(37, 23, scanlines))
    assert (width, height) == (37, 23)
    plain = [b"\x00" + row for row in rows]
    assert decode_png(imagen.encode_png(37, 23, plain))[2] == rows


def test_palette_png_round_trip_through_an_independent_reader():
    palette = bytes((i * 3 + c * 80) & 255 for i in range(256) for c in range(3))
    indexes = [bytes((x + 5 * y) & 255 for x in range(41)) for y in range(19)]
    scanlines = [b"\x00" + row for row in indexes]
    width, height, rows = decode_png(imagen.encode_png(41, 19, scanlines, palette=palette))
    assert (width, height) == (41, 19)
    assert rows == [b"".join(palette[3 * i:3 * i + 3] for i in row) for row in indexes]


def test_mock_image_is_a_gradient_that_decodes_through_its_up_filtered_rows():
    _, _, rows = decode_png(imagen.mock_png("a fox", 3, 64, 48))
    assert len(rows) == 48 and all(len(r) == 64 * 3 for r in rows)
    assert len(set(rows)) > 4          # a gradient, not a flat fill
    assert rows[0] != rows[-1]


def test_generated_image_has_requested_size_and_recorded_actual_size(run_main, tmp_path):
    run = run_main("generate", "x", "--size", "320x200", "--json", "--output", tmp_path / "a.png")
    record = json.loads(run.out)
    assert (record["width"], record["height"], record["requested_size"]) == (320, 200, "320x200")
    assert decode_png((tmp_path / "a.png").read_bytes())[:2] == (320, 200)


def test_json_prints_the_sidecar_record_plus_absolute_path(run_main, tmp_path):
    run = run_main("generate", "a fox", "--json", "--seed", "3", "--output", "sub/fox.png")
    record = json.loads(run.out)
    sidecar = json.loads((tmp_path / "sub" / "fox.png.json").read_text())
    assert record.pop("path") == str(tmp_path / "sub" / "fox.png")
    assert record == sidecar


def test_sidecar_has_every_field_of_the_record(run_main, tmp_path):
    run_main("generate", "a fox", "--seed", "3", "--output", "fox.png", "--negative", "blur")
    sidecar = json.loads((tmp_path / "fox.png.json").read_text())
    assert list(sidecar) == list(imagen.RECORD_FIELDS)
    data = (tmp_path / "fox.png").read_bytes()
    import hashlib
    assert sidecar["sha256"] == hashlib.sha256(data).hexdigest()
    assert sidecar["bytes"] == len(data)
    assert sidecar["schema"] == "imagen/1" and sidecar["negative"] == "blur"
    assert sidecar["adapter"] == "mock" and sidecar["backend"] == "mock"
    assert sidecar["caller"] == "tester" and sidecar["imagen_version"] == imagen.version_string()
    assert sidecar["created_at"][19] in "+-" and sidecar["created_at"][22] == ":"
    assert sidecar["cost_usd"] == 0.0 and isinstance(sidecar["latency_ms"], int)


def test_latency_is_recorded_in_milliseconds(run_main, write_config):
    """Its bounds: the mock's delay below, the whole call above (measured around it, so no
    bound on how fast a machine is). Seconds, or milliseconds of whole seconds, fail."""
    import time
    config = write_config("backends:\n  slow:\n    adapter: mock\n    delay: 0.05\n")
    started = time.monotonic()
    run = run_main("--config", config, "generate", "x", "--backend", "slow", "--size", "64x64",
                   "--json", "-o", "a.png")
    whole_call_ms = (time.monotonic() - started) * 1000
    latency_ms = json.loads(run.out)["latency_ms"]
    assert isinstance(latency_ms, int) and 50 <= latency_ms <= whole_call_ms, run
    assert latency_ms % 1000 != 0


def test_caller_comes_from_mai_from_id_first(run_main, tmp_path):
    run = run_main("generate", "x", "--json", "-o", "a.png", extra_env={"MAI_FROM_ID": "agent-7"})
    assert json.loads(run.out)["caller"] == "agent-7"


def test_no_sidecar_flag_skips_the_sidecar(run_main, tmp_path):
    run_main("generate", "x", "--no-sidecar", "--output", "a.png")
    assert listing(tmp_path) == ["a.png"] or "a.png.json" not in listing(tmp_path)


def test_png_embeds_record_in_itxt_and_parameters_in_text(run_main, tmp_path):
    run_main("generate", "a fox", "--seed", "5", "--negative", "blur", "--output", "f.png")
    data = (tmp_path / "f.png").read_bytes()
    chunks = png_text_chunks(data)
    keyword, _, rest = chunks[b"iTXt"][0].partition(b"\x00")
    assert keyword == b"imagen" and rest[:4] == b"\x00\x00\x00\x00"
    embedded = json.loads(rest[4:].decode("utf-8"))
    assert embedded["seed"] == 5 and embedded["prompt"] == "a fox"
    assert not {"file", "bytes", "sha256"} & set(embedded)
    parameters = chunks[b"tEXt"][0].decode("latin-1")
    assert parameters.startswith("parameters\x00a fox\nNegative prompt: blur\nSteps: ")
    assert "Seed: 5" in parameters
    # the text chunks stand before the image data
    order = [data.index(k) for k in (b"iTXt", b"tEXt", b"IDAT")]
    assert order == sorted(order)


def test_non_latin1_prompt_goes_into_an_itxt_parameters_chunk(run_main, tmp_path):
    run_main("generate", "ein Fuchs im Schnee \u2603", "--output", "f.png")
    texts = imagen.png_texts((tmp_path / "f.png").read_bytes())
    assert texts["parameters"].startswith("ein Fuchs im Schnee \u2603")


def test_embed_metadata_false_writes_plain_png(run_main, write_config, tmp_path):
    path = write_config("output:\n  embed_metadata: false\n")
    run_main("--config", path, "generate", "x", "--output", "f.png")
    assert b"iTXt" not in (tmp_path / "f.png").read_bytes()


def test_count_writes_n_images_with_consecutive_seeds(run_main, tmp_path):
    run = run_main("generate", "x", "--count", "3", "--seed", "10", "--json", "-o", "o/a.png")
    records = [json.loads(line) for line in run.lines]
    assert [r["seed"] for r in records] == [10, 11, 12]
    assert listing(tmp_path / "o") == ["a-2.png", "a-2.png.json", "a-3.png", "a-3.png.json",
                                       "a.png", "a.png.json"]


def test_count_with_random_seeds_draws_distinct_ones(run_main):
    run = run_main("generate", "x", "--count", "3", "--json")
    seeds = [json.loads(line)["seed"] for line in run.lines]
    assert len(set(seeds)) == 3 and all(1 <= s <= 2 ** 32 - 1 for s in seeds)


def test_prompt_dash_reads_stdin(cli, tmp_path):
    run = cli("generate", "-", "--json", "-o", "a.png", stdin="  a lighthouse at dusk\n")
    assert run.code == 0, run
    assert json.loads(run.out)["prompt"] == "a lighthouse at dusk"


class EndlessStdin:
    """sys.stdin reading as /dev/zero would (up to `limit` bytes), counting what is read."""

    def __init__(self, limit=64 * 1024 * 1024):
        import io

        class Zeros(io.RawIOBase):
            taken = 0

            def readable(self):
                return True

            def readinto(self, buffer):
                size = min(len(buffer), limit - Zeros.taken)
                buffer[:size] = b"\0" * size
                Zeros.taken += size
                return size

        self.raw = Zeros()
        self.buffer = io.BufferedReader(self.raw)

    def read(self, size=-1):
        return self.buffer.read(size).decode("utf-8")

    @property
    def taken(self):
        return self.raw.taken


def test_prompt_on_stdin_is_read_up_to_a_cap(run_main, monkeypatch, tmp_path):
    stdin = EndlessStdin()
    monkeypatch.setattr(sys, "stdin", stdin)
    run = run_main("generate", "-", "-o", "a.png")
    assert run.code == 2 and run.err == ("imagen: generate -: the prompt on stdin is over %d bytes "
                                         "(at most 20000 characters are allowed)\n"
                                         % imagen.MAX_STDIN_PROMPT_BYTES)
    assert stdin.taken <= imagen.MAX_STDIN_PROMPT_BYTES + 64 * 1024 and listing(tmp_path) == []


def test_style_applies_template_negative_and_size(run_main, write_config, tmp_path):
    path = write_config(
        "styles:\n  wide:\n    prompt: '{prompt}, flat colours'\n    negative: text\n"
        "    size: 256x128\n")
    run = run_main("--config", path, "generate", "a fox", "--style", "wide", "--json", "-o", "a.png")
    record = json.loads(run.out)
    assert record["final_prompt"] == "a fox, flat colours" and record["prompt"] == "a fox"
    assert record["negative"] == "text" and (record["width"], record["height"]) == (256, 128)
    assert record["style"] == "wide"


def test_flags_beat_style_which_beats_backend_block(run_main, write_config):
    path = write_config(
        "backends:\n  m:\n    adapter: mock\n    size: 128x128\n    steps: 9\n"
        "styles:\n  s:\n    size: 256x128\n")
    run = run_main("--config", path, "generate", "x", "--backend", "m", "--json", "-o", "a.png")
    assert json.loads(run.out)["steps"] == 9
    assert json.loads(run.out)["requested_size"] == "128x128"
    run = run_main("--config", path, "generate", "x", "--backend", "m", "--style", "s",
                   "--json", "-o", "b.png")
    assert json.loads(run.out)["requested_size"] == "256x128"
    run = run_main("--config", path, "generate", "x", "--backend", "m", "--style", "s",
                   "--size", "64x64", "--steps", "3", "--json", "-o", "c.png")
    assert json.loads(run.out)["requested_size"] == "64x64" and json.loads(run.out)["steps"] == 3


def test_timeout_exits_1_and_writes_nothing(run_main, write_config, tmp_path, fake_clock):
    path = write_config("backends:\n  slow:\n    adapter: mock\n    delay: 30\n")
    run = run_main("--config", path, "generate", "x", "--backend", "slow", "--timeout", "0.2",
                   "-o", "out/a.png")
    assert run.code == 1 and run.err == "imagen: slow: timed out\n"
    assert not (tmp_path / "out").exists()


def test_mock_gate_holds_the_job_until_its_file_exists_or_the_timeout(run_main, write_config,
                                                                      tmp_path):
    gate = tmp_path / "gate"
    path = write_config("backends:\n  held:\n    adapter: mock\n    gate: %s\n" % gate)
    run = run_main("--config", path, "generate", "x", "--backend", "held", "--timeout", "0.1",
                   "-o", "out/a.png")
    assert run.code == 1 and run.err == "imagen: held: timed out\n"
    assert not (tmp_path / "out").exists()
    gate.touch()
    run = run_main("--config", path, "generate", "x", "--backend", "held", "-o", "out/a.png")
    assert run.code == 0 and (tmp_path / "out" / "a.png").exists(), run


def test_backend_failure_exits_1_with_one_line(run_main, write_config, tmp_path):
    path = write_config("backends:\n  broken:\n    adapter: mock\n    fail: out of memory\n")
    run = run_main("--config", path, "generate", "x", "--backend", "broken", "-o", "a.png")
    assert run.code == 1 and run.err == "imagen: broken: out of memory\n"
    assert not (tmp_path / "a.png").exists()


def test_ctrl_c_cancels_and_exits_130_without_traceback(env, write_config, tmp_path):
    path = write_config("backends:\n  slow:\n    adapter: mock\n    delay: 60\n")
    master, slave = pty.openpty()   # stderr on a terminal, so progress shows when it works
    proc = popen_imagen(["--config", path, "generate", "x", "--backend", "slow",
                         "-o", tmp_path / "a.png"], stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    seen = b""

    def working():
        nonlocal seen
        seen += os.read(master, 4096)
        return b"mock: working" in seen
    try:
        poll(working, timeout=20, message="progress on the terminal")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 130
        rest = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            rest += chunk
    finally:
        proc.kill()
        os.close(master)
    assert b"imagen: interrupted" in rest and b"Traceback" not in rest
    assert not (tmp_path / "a.png").exists()


def test_sigterm_takes_the_same_path_as_ctrl_c(cli, env, write_config, tmp_path):
    path = write_config("backends:\n  slow:\n    adapter: mock\n    delay: 60\n")
    master, slave = pty.openpty()
    proc = popen_imagen(["--config", path, "generate", "x", "--backend", "slow"],
                        stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    try:
        poll(lambda: b"mock: working" in os.read(master, 4096), timeout=20, message="progress")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 130
    finally:
        proc.kill()
        os.close(master)


def test_quiet_shows_no_progress_even_on_a_terminal():
    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as stream:
        imagen.Console(quiet=True, stream=stream).progress("step 1/4")
        imagen.Console(quiet=False, stream=stream).progress("step 2/4")
    seen = os.read(master, 4096)
    os.close(master)
    assert b"step 1/4" not in seen and b"step 2/4" in seen


def test_debug_shows_a_traceback_only_with_imagen_debug(run_main):
    run = run_main("generate", "x", "--size", "1x1")
    assert "Traceback" not in run.err
    run = run_main("generate", "x", "--size", "1x1", extra_env={"IMAGEN_DEBUG": "1"})
    assert "Traceback" in run.err and run.err.rstrip().endswith("out of range: each side must be 64..4096")


# ----- image input (SPEC section 10) on the mock -----

def padded_png(png, size):
    """A valid PNG of about `size` bytes: `png` with a private chunk of random filler."""
    filler = os.urandom(max(0, size - len(png) - 12))
    return imagen.png_insert_chunks(png, imagen.png_chunk(b"fiLl", filler))


def test_mock_output_depends_on_every_input_and_takes_a_png_inputs_size(run_main, tmp_path):
    (tmp_path / "a.png").write_bytes(imagen.mock_png("a", 1, 96, 80))
    (tmp_path / "b.png").write_bytes(imagen.mock_png("b", 1, 96, 80))

    def pixels(*flags):
        run = run_main("generate", "a fox", "--seed", "7", "-o", "out.png", *flags)
        assert run.code == 0, run
        return decode_png((tmp_path / "out.png").read_bytes())
    width, height, with_a = pixels("-i", "a.png")
    assert (width, height) == (96, 80)                       # the input's size, no --size
    assert pixels("-i", "a.png")[2] == with_a                # deterministic
    assert pixels("-i", "b.png")[2] != with_a                # other input, other pixels
    assert pixels("-i", "a.png", "-i", "b.png")[2] != with_a
    assert pixels("-i", "a.png", "--strength", "0.3")[2] != with_a
    assert pixels("-i", "a.png", "--size", "64x64")[:2] == (64, 64)
    assert pixels()[:2] == (1024, 1024)


def test_edit_takes_default_edit_backend_and_the_inputs_size(run_main, write_config, tmp_path):
    (tmp_path / "in.png").write_bytes(imagen.mock_png("a", 1, 120, 72))
    config = write_config("default_backend: plain\ndefault_edit_backend: editor\nbackends:\n"
                          "  plain:\n    adapter: mock\n  editor:\n    adapter: mock\n")
    run = run_main("--config", config, "edit", "in.png", "make it blue", "--json", "-o", "e.png")
    record = json.loads(run.out)
    assert run.code == 0 and record["backend"] == "editor"
    assert (record["width"], record["height"]) == (120, 72) and record["requested_size"] == "120x72"
    run = run_main("--config", config, "edit", "in.png", "blue", "--json", "-o", "e.png",
                   "--backend", "plain", "--size", "64x64")
    record = json.loads(run.out)
    assert record["backend"] == "plain" and record["width"] == 64
    assert run_main("--config", config, "generate", "x", "-o", "g.png", "--json").out.count('"plain"')
    bad = write_config("default_edit_backend: nope\n", name="bad.yaml")
    run = run_main("--config", bad, "config", "validate")
    assert run.code == 2 and "default_edit_backend" in run.err and "no backend named 'nope'" in run.err


def test_record_has_its_id_and_each_inputs_with_the_id_of_one_imagen_made(run_main, tmp_path, env):
    first = json.loads(run_main("generate", "a fox", "-o", "first.png", "--json").out)
    assert imagen.is_uuid(first["id"]) and first["inputs"] == [] and first["strength"] is None
    (tmp_path / "photo.png").write_bytes(solid_png(70, 50))
    run = run_main("edit", "first.png", "make it blue", "-i", "photo.png", "--strength", "0.5",
                   "-o", "second.png", "--json")
    second = json.loads(run.out)
    data = (tmp_path / "first.png").read_bytes()
    import hashlib
    assert second["inputs"] == [
        {"path": str(tmp_path / "first.png"), "sha256": hashlib.sha256(data).hexdigest(),
         "bytes": len(data), "mime_type": "image/png", "width": 1024, "height": 1024,
         "id": first["id"]},
        {"path": str(tmp_path / "photo.png"), "sha256": hashlib.sha256(solid_png(70, 50)).hexdigest(),
         "bytes": len(solid_png(70, 50)), "mime_type": "image/png", "width": 70, "height": 50}]
    assert second["strength"] == 0.5 and second["id"] != first["id"]
    embedded = json.loads(imagen.png_texts((tmp_path / "second.png").read_bytes())["imagen"])
    sidecar = json.loads((tmp_path / "second.png.json").read_text())
    assert embedded["id"] == sidecar["id"] == second["id"]
    assert embedded["inputs"] == sidecar["inputs"] == second["inputs"]
    with imagen.open_ledger(env) as ledger:
        rows = {row["id"]: row["record"] for row in ledger.rows()}
    assert set(rows) == {first["id"], second["id"]}            # the ledger's id is the record's
    assert rows[second["id"]]["inputs"][0]["id"] == first["id"]


def test_inspect_follows_the_chain_of_inputs_through_files_and_the_ledger(run_main, tmp_path):
    one = json.loads(run_main("generate", "a fox", "-o", "1.png", "--json", "--size", "64x64").out)
    two = json.loads(run_main("edit", "1.png", "blue fox", "-o", "2.png", "--json").out)
    three = json.loads(run_main("edit", "2.png", "blue fox at night", "-o", "3.png", "--json").out)
    chain = json.loads(run_main("inspect", "3.png").out)["chain"]
    assert [(s["id"], s["prompt"], s["found"]) for s in chain] == [
        (two["id"], "blue fox", "file"), (one["id"], "a fox", "file")]
    os.unlink(tmp_path / "2.png")          # gone from disk: the ledger still knows it
    os.unlink(tmp_path / "2.png.json")
    chain = json.loads(run_main("inspect", "3.png").out)["chain"]
    assert [(s["id"], s["prompt"], s["found"]) for s in chain] == [
        (two["id"], "blue fox", "ledger"), (one["id"], "a fox", "file")]
    assert json.loads(run_main("inspect", "1.png").out)["chain"] == []
    assert three["inputs"][0]["path"] == str(tmp_path / "2.png")


# ===== Input rules: exit 2, one line, nothing written =====

BAD_INPUTS = [
    (["generate", "x", "--size", "1024"], "size must be WxH"),
    (["generate", "x", "--size", "63x64"], "size 63x64 is out of range"),
    (["generate", "x", "--size", "64x4097"], "size 64x4097 is out of range"),
    (["generate", "x", "--size", "64x63"], "size 64x63 is out of range"),
    (["generate", "x", "--size", "4097x64"], "size 4097x64 is out of range"),
    (["generate", "x", "--size", "axb"], "size must be WxH"),
    (["generate", "x", "--steps", "201"], "steps must be a whole number from 0 to 200"),
    (["generate", "x", "--steps", "-1"], "steps must be a whole number from 0 to 200"),
    (["generate", "x", "--seed", "-1"], "seed must be a whole number from 0 to"),
    (["generate", "x", "--seed", str(2 ** 63)], "seed must be a whole number from 0 to"),
    (["generate", "x", "--seed", str(2 ** 63 - 1), "--count", "2"], "goes past"),
    (["generate", "   "], "prompt is empty"),
    (["generate", "x" * 20001], "prompt is 20001 characters"),
    (["generate", "x", "--backend", "nope"], "unknown backend 'nope' (known: mock)"),
    (["generate", "x", "--style", "nope"], "unknown style 'nope'"),
    (["generate", "x", "--count", "0"], "count must be a whole number from 1 to 100"),
    (["generate", "x", "--count", "101"], "count must be a whole number from 1 to 100"),
    (["generate", "x", "--timeout", "0"], "timeout must be a number of seconds above 0"),
    (["generate", "x", "--config", "missing.yaml"], "config: missing.yaml: no such file"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUTS, ids=[" ".join(a)[:40] for a, _ in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(run_main, tmp_path, env, argv, message):
    before = listing(tmp_path)
    run = run_main(*(argv + ["--output", "out/a.png"]))
    assert run.code == 2, run
    assert run.err.startswith("imagen: ") and run.err.count("\n") == 1 and message in run.err
    assert run.out == "" and listing(tmp_path) == before


@pytest.mark.parametrize("argv,line", [
    (["generate", "   "], "imagen: generate: prompt is empty\n"),
    (["generate", "x", "--style", "nope"], "imagen: generate: unknown style 'nope' (known: none configured)\n"),
    (["usage", "--local", "--since", "May"], "imagen: usage: --since must be a date YYYY-MM-DD (got 'May')\n"),
])
def test_input_errors_name_their_command(run_main, argv, line):
    run = run_main(*argv)
    assert run.code == 2 and run.err == line


# The inside of every bound refused above: a bound off by one either way fails one side.
EDGE_INPUTS = [
    (["x", "--size", "64x64"], lambda r: (r.width, r.height) == (64, 64)),
    (["x", "--size", "4096x4096"], lambda r: (r.width, r.height) == (4096, 4096)),
    (["y" * 20000], lambda r: r.prompt == "y" * 20000),
    (["x", "--steps", "0"], lambda r: r.steps == 0),
    (["x", "--steps", "200"], lambda r: r.steps == 200),
    (["x", "--count", "1"], lambda r: r.count == 1),
    (["x", "--count", "100"], lambda r: r.count == 100),
    (["x", "--seed", "0"], lambda r: 1 <= r.seed <= imagen.RANDOM_SEED_MAX),   # 0: draw one
    (["x", "--seed", str(2 ** 63 - 1)], lambda r: r.seed == 2 ** 63 - 1),
]


@pytest.mark.parametrize("argv,asked_for", EDGE_INPUTS,
                         ids=[" ".join(a)[:30] for a, _ in EDGE_INPUTS])
def test_every_input_bound_is_accepted_from_inside(run_main, monkeypatch, argv, asked_for):
    """The backend is reached with the value as given; it then stops the job, so that
    count 100 or 4096x4096 costs no 100 files or 16 megapixels."""
    requests = []

    def take_the_request_and_stop(adapter, request, deadline):
        requests.append(request)
        raise imagen.ImagenError("mock: got the request")
    monkeypatch.setattr(imagen.MockAdapter, "generate", take_the_request_and_stop)
    run = run_main("generate", *argv, "-o", "a.png")
    assert run.code == 1 and run.err.endswith("mock: got the request\n"), run
    [request] = requests
    assert asked_for(request), argv


def test_seed_of_2_63_minus_1_is_accepted(run_main):
    run = run_main("generate", "x", "--seed", str(2 ** 63 - 1), "--json", "-o", "a.png")
    assert json.loads(run.out)["seed"] == 2 ** 63 - 1


def test_output_into_a_missing_directory_creates_it(run_main, tmp_path):
    run = run_main("generate", "x", "-o", "a/b/c/img.png")
    assert run.code == 0 and (tmp_path / "a" / "b" / "c" / "img.png").exists()


def test_bad_input_images_are_exit_2_naming_the_file_and_nothing_is_written(run_main, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "anim.gif").write_bytes(b"GIF89a" + b"\x00" * 40)
    (tmp_path / "huge.png").write_bytes(padded_png(solid_png(8, 8), imagen.MAX_INPUT_BYTES + 1))
    (tmp_path / "broken.png").write_bytes(solid_png(8, 8)[:-5])
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "ok.png").write_bytes(solid_png(8, 8))
    cases = [("missing.png", "No such file"), ("empty.png", "empty"),
             ("notes.txt", "not a PNG, JPEG or WebP"), ("anim.gif", "not a PNG, JPEG or WebP"),
             ("huge.png", "over the 20 MiB limit"), ("broken.png", "not a PNG, JPEG or WebP"),
             ("dir.png", "not a regular file")]
    for name, words in cases:
        run = run_main("generate", "x", "-o", "out.png", "-i", "ok.png", "-i", name)
        assert run.code == 2 and "--image %s" % name in run.err and words in run.err, (name, run)
    run = run_main("generate", "x", "-o", "out.png", *["-i", "ok.png"] * 9)
    assert run.code == 2 and "at most 8 input images" in run.err
    assert sorted(os.listdir(tmp_path)) == ["anim.gif", "broken.png", "dir.png", "empty.png",
                                            "home", "huge.png", "notes.txt", "ok.png"]
    (tmp_path / "just-8.png").write_bytes(padded_png(solid_png(8, 8), imagen.MAX_INPUT_BYTES))
    assert run_main("generate", "x", "-o", "out.png", "-i", "just-8.png").code == 0


def test_strength_is_above_0_at_most_1_and_goes_with_an_image(run_main, tmp_path):
    (tmp_path / "ok.png").write_bytes(solid_png(8, 8))
    for value in ("0", "-0.1", "1.01", "nan"):
        run = run_main("generate", "x", "-i", "ok.png", "--strength", value, "-o", "o.png")
        assert run.code == 2 and "--strength must be a number above 0 and at most 1" in run.err, value
    run = run_main("generate", "x", "--strength", "0.5", "-o", "o.png")
    assert run.code == 2 and "--strength goes with --image" in run.err
    assert not (tmp_path / "o.png").exists()
    assert run_main("generate", "x", "-i", "ok.png", "--strength", "1", "-o", "o.png").code == 0


# ===== Naming and writes =====

def test_template_path_never_overwrites_an_existing_file(run_main, write_config, tmp_path):
    path = write_config("output:\n  dir: %s\n  naming: 'fixed.{ext}'\n" % (tmp_path / "pics"))
    paths = [run_main("--config", path, "generate", "x").out.strip() for _ in range(3)]
    assert [os.path.basename(p) for p in paths] == ["fixed.png", "fixed-2.png", "fixed-3.png"]
    assert len({open(p, "rb").read() for p in paths}) == 3   # three seeds, three images


def test_explicit_output_overwrites_like_curl(run_main, tmp_path):
    (tmp_path / "a.png").write_bytes(b"old")
    run = run_main("generate", "x", "-o", "a.png")
    assert run.code == 0 and (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_writes_leave_no_temp_files(run_main, tmp_path):
    run_main("generate", "x", "-o", "a.png", "--count", "2")
    assert listing(tmp_path) == ["a-2.png", "a-2.png.json", "a.png", "a.png.json"]

def test_output_named_for_another_image_format_warns_once_and_writes_as_asked(run_main, tmp_path):
    run = run_main("generate", "x", "-o", "fox.jpg", "--count", "2")
    assert run.code == 0 and run.err == ("imagen: --output fox.jpg: the image is PNG, but the "
                                         "name says .jpg; written as asked\n"), run
    assert (tmp_path / "fox.jpg").read_bytes()[:4] == b"\x89PNG"
    for name in ("fox.png", "fox.PNG", "fox", "fox.img"):
        assert run_main("generate", "x", "-o", name).err == ""


def test_naming_placeholders_and_unknown_ones_stay_literal(run_main, write_config, tmp_path):
    path = write_config("output:\n  dir: %s\n  naming: '{backend}/{slug}-{seed}-{nope}-{time}.{ext}'\n"
                        % (tmp_path / "p"))
    out = run_main("--config", path, "generate", "Caf\u00e9 au lait", "--seed", "9").out.strip()
    name = os.path.relpath(out, str(tmp_path / "p"))
    backend, rest = name.split(os.sep)
    assert backend == "mock" and rest.startswith("cafe-au-lait-9-{nope}-") and rest.endswith(".png")


def test_a_null_seed_is_named_noseed_and_left_out_of_the_parameters_text(env, tmp_path):
    """A backend without seeds (openai) records seed null."""
    config = imagen.Config(imagen.merge_defaults({"output": {"dir": str(tmp_path)}}), "", False)
    job = imagen.resolve_job(config, env, prompt="a fox")
    record = {"mime_type": "image/png", "seed": None, "final_prompt": "a fox", "negative": "",
              "steps": 0, "width": 8, "height": 8, "model": "m", "backend": "b"}
    path, _ = imagen.image_path(job, config, record, 0, 0.0)
    assert path.endswith(os.sep + "a-fox-noseed.png")
    assert imagen.parameters_text(record) == "a fox\nSteps: 0, Size: 8x8, Model: m, Backend: b"


@pytest.mark.parametrize("prompt,slug", [
    ("../../etc/passwd", "etc-passwd"),
    ("..", "image"),
    ("\u00c9t\u00e9 \u00e0 Paris", "ete-a-paris"),
    ("A" * 60, "a" * 40),
    ("x" * 39 + " y", "x" * 39),
    ("\u2603\u2603", "image"),
])
def test_slug_is_safe_ascii(prompt, slug):
    assert imagen.slugify(prompt) == slug


def test_hostile_values_cannot_escape_the_output_dir(run_main, write_config, tmp_path):
    path = write_config("output:\n  dir: %s\n  naming: '{backend}/{slug}.{ext}'\n"
                        "backends:\n  ../..:\n    adapter: mock\n" % (tmp_path / "p"))
    run = run_main("--config", path, "generate", "../../etc/passwd", "--backend", "../..")
    assert run.code == 0, run
    assert run.out.strip().startswith(str(tmp_path / "p") + os.sep)
    assert ".." not in os.path.relpath(run.out.strip(), str(tmp_path / "p"))


# ===== Image checks =====

def jpeg_bytes(width, height):
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + b"\x00" * 9 + sof + b"\xff\xd9"


def webp_bytes(kind, width, height):
    if kind == "VP8 ":
        body = b"\x00\x00\x00\x9d\x01\x2a" + struct.pack("<HH", width, height)
    elif kind == "VP8L":
        body = b"\x2f" + struct.pack("<I", (width - 1) | ((height - 1) << 14))
    else:
        body = b"\x00" * 4 + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    chunk = kind.encode() + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


@pytest.mark.parametrize("data,expected", [
    (jpeg_bytes(1344, 768), ("image/jpeg", 1344, 768)),
    (webp_bytes("VP8 ", 1024, 640), ("image/webp", 1024, 640)),
    (webp_bytes("VP8L", 300, 200), ("image/webp", 300, 200)),
    (webp_bytes("VP8X", 2048, 1536), ("image/webp", 2048, 1536)),
])
def test_jpeg_and_webp_dimensions_are_read_from_their_headers(data, expected):
    assert imagen.image_info(data) == expected


def corrupt(data, offset):
    return data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1:]


@pytest.mark.parametrize("mangle,message", [
    (lambda d: d[:30], "truncated"),
    (lambda d: corrupt(d, 20), "bad CRC"),
    (lambda d: corrupt(d, len(d) - 20), "bad CRC"),
    (lambda d: corrupt(d, 1), "not an image"),
    (lambda d: b"<html>oops</html>", "not an image"),
    (lambda d: b"\xff\xd8\xff\xe0\x00\x10JFIF", "JPEG"),
    (lambda d: b"RIFF\x00\x00\x00\x00WEBPVP8 ", "WebP"),
])
def test_bad_image_bytes_are_rejected(mangle, message):
    with pytest.raises(imagen.ImagenError) as error:
        imagen.image_info(mangle(imagen.mock_png("x", 1, 64, 64)))
    assert message in error.value.message


def test_backend_returning_non_image_bytes_exits_1_and_writes_nothing(run_main, tmp_path, monkeypatch):
    monkeypatch.setattr(imagen, "mock_png", lambda *a: b"<html>502 Bad Gateway</html>")
    run = run_main("generate", "x", "-o", "a.png")
    assert run.code == 1 and run.err.startswith("imagen: mock: bad image: not an image")
    assert listing(tmp_path) == []


# ----- decoding and downscaling PNGs (the MCP preview, later thumbnails) -----

ADAM7_PASSES = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4),
                (1, 0, 2, 2), (0, 1, 1, 2))
SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def png_filter(kind, line, previous, bpp):
    """One scanline filtered as the PNG spec defines it, byte by byte."""
    out = bytearray()
    for i, x in enumerate(line):
        a = line[i - bpp] if i >= bpp else 0
        b = previous[i]
        c = previous[i - bpp] if i >= bpp else 0
        p = a + b - c
        paeth = a if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - c) else \
            b if abs(p - b) <= abs(p - c) else c
        out.append((x - (0, a, b, (a + b) // 2, paeth)[kind]) & 255)
    return bytes(out)


def pack_samples(samples, depth):
    if depth == 16:
        return b"".join(struct.pack(">H", s) for s in samples)
    if depth == 8:
        return bytes(samples)
    bits = "".join(format(s, "0%db" % depth) for s in samples)
    bits += "0" * (-len(bits) % 8)
    return bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8))


def make_png(pixels, color, depth, interlace=False, palette=None, trns=None):
    """A PNG written from the spec: `pixels` is rows of per-pixel sample tuples at `depth`;
    scanlines cycle through the five filter types."""
    height, width = len(pixels), len(pixels[0])
    samples = SAMPLES[color]
    bpp = max(1, samples * depth // 8)
    passes = ADAM7_PASSES if interlace else ((0, 0, 1, 1),)
    raw, kind = b"", 0
    for x0, y0, dx, dy in passes:
        lines = [pack_samples([s for px in pixels[y][x0::dx] for s in px], depth)
                 for y in range(y0, height, dy) if x0 < width]
        previous = bytes(len(lines[0])) if lines else b""
        for line in lines:
            raw += bytes([kind]) + png_filter(kind, line, previous, bpp)
            previous, kind = line, (kind + 1) % 5

    def chunk(name, body):
        return struct.pack(">I", len(body)) + name + body + struct.pack(
            ">I", zlib.crc32(name + body) & 0xFFFFFFFF)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(
        ">IIBBBBB", width, height, depth, color, 0, 0, int(interlace)))
    if palette:
        data += chunk(b"PLTE", bytes(v for rgb in palette for v in rgb))
    if trns:
        data += chunk(b"tRNS", bytes(trns))
    # the image data split over two IDAT chunks, as encoders may do
    packed = zlib.compress(raw)
    half = len(packed) // 2
    return data + chunk(b"IDAT", packed[:half]) + chunk(b"IDAT", packed[half:]) + chunk(b"IEND", b"")


PNG_KINDS = [(0, 1), (0, 2), (0, 4), (0, 8), (0, 16), (2, 8), (2, 16), (3, 1), (3, 2), (3, 4),
             (3, 8), (4, 8), (4, 16), (6, 8), (6, 16)]


@pytest.mark.parametrize("interlace", [False, True], ids=["progressive", "adam7"])
@pytest.mark.parametrize("color,depth", PNG_KINDS)
def test_decode_png_reads_every_colour_type_depth_filter_and_interlacing(color, depth, interlace):
    import random
    rnd = random.Random(color * 100 + depth)
    width, height, top = 13, 11, (1 << depth) - 1
    palette = [(rnd.randrange(256), rnd.randrange(256), rnd.randrange(256)) for _ in range(top + 1)] \
        if color == 3 else None
    trns = [rnd.randrange(256) for _ in range(3)] if color == 3 and depth == 8 else None
    pixels = [[tuple(rnd.randrange(top + 1) for _ in range(SAMPLES[color])) for _ in range(width)]
              for _ in range(height)]
    image = imagen.decode_png(make_png(pixels, color, depth, interlace, palette, trns))

    def expected(px):
        if color == 3:
            index = px[0]
            alpha = (trns[index] if index < len(trns) else 255,) if trns else ()
            return palette[index] + alpha
        if depth == 16:
            return tuple(s >> 8 for s in px)
        return tuple(s * 255 // top for s in px)
    assert (image.width, image.height) == (width, height)
    assert image.channels == (4 if trns else 3) if color == 3 else SAMPLES[color]
    assert image.rows == [b"".join(bytes(expected(px)) for px in row) for row in pixels]


def test_decode_png_agrees_with_the_independent_reader_on_the_mock_image():
    data = imagen.mock_png("a fox", 7, 96, 80)
    image = imagen.decode_png(data)
    assert (image.width, image.height, image.channels) == (96, 80, 3)
    assert image.rows == decode_png(data)[2]


def png_with_data(width, height, raw):
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + imagen.png_chunk(b"IHDR", header)
            + imagen.png_chunk(b"IDAT", raw) + imagen.png_chunk(b"IEND", b""))


@pytest.mark.parametrize("raw,message", [
    (zlib.compress(b"\x00abcd" * 3), "truncated (15 of 20 bytes)"),
    (zlib.compress(b"\x05abcd" * 4), "unknown filter type 5"),
    (b"\x78\x9c\xff\xff\xff", "corrupt"),
])
def test_decode_png_refuses_broken_image_data(raw, message):
    with pytest.raises(imagen.ImagenError) as error:
        imagen.decode_png(png_with_data(4, 4, raw))
    assert message in error.value.message


def test_decode_png_refuses_an_image_over_the_pixel_limit_before_inflating_it():
    with pytest.raises(imagen.ImagenError) as error:
        imagen.decode_png(png_with_data(20000, 20000, zlib.compress(b"")))
    assert "at most" in error.value.message


def test_area_averaging_weighs_each_source_pixel_by_how_much_it_covers():
    # 3 -> 2: output 0 is source 0 and half of source 1, output 1 the other half and source 2
    image = imagen.PngImage(3, 1, 1, [bytes([0, 90, 255])])
    assert imagen.resize_area(image, 2, 1).rows == [bytes([30, 200])]
    column = imagen.PngImage(1, 3, 1, [b"\x00", b"\x5a", b"\xff"])
    assert imagen.resize_area(column, 1, 2).rows == [b"\x1e", b"\xc8"]
    # a 1-pixel checkerboard averages to grey: nearest-neighbour would keep black or white
    board = imagen.PngImage(4, 2, 1, [bytes([0, 255, 0, 255]), bytes([255, 0, 255, 0])])
    assert imagen.resize_area(board, 2, 1).rows == [bytes([128, 128])]


def reference_area_average(rows, width, height, channels, out_width, out_height):
    """Exact area averaging in floating point, for comparison."""
    out = []
    for j in range(out_height):
        y0, y1 = j * height / out_height, (j + 1) * height / out_height
        line = bytearray()
        for i in range(out_width):
            x0, x1 = i * width / out_width, (i + 1) * width / out_width
            sums = [0.0] * channels
            for y in range(int(y0), min(height, int(y1) + 1)):
                wy = min(y1, y + 1) - max(y0, y)
                for x in range(int(x0), min(width, int(x1) + 1)):
                    weight = wy * (min(x1, x + 1) - max(x0, x))
                    if weight > 0:
                        for c in range(channels):
                            sums[c] += weight * rows[y][x * channels + c]
            area = (y1 - y0) * (x1 - x0)
            line += bytes(int(s / area + 0.5) for s in sums)
        out.append(bytes(line))
    return out


@pytest.mark.parametrize("channels,size,out", [(3, (64, 48), (32, 24)), (4, (40, 30), (16, 12)),
                                               (1, (37, 23), (13, 8)), (2, (25, 31), (9, 11))])
def test_area_averaging_matches_an_exact_reference(channels, size, out):
    import random
    rnd = random.Random(channels)
    rows = [bytes(rnd.randrange(256) for _ in range(size[0] * channels)) for _ in range(size[1])]
    got = imagen.resize_area(imagen.PngImage(size[0], size[1], channels, rows), *out).rows
    want = reference_area_average(rows, size[0], size[1], channels, *out)
    # a whole factor is exact; otherwise the two passes each round once
    tolerance = 0 if size[0] % out[0] == 0 and size[1] % out[1] == 0 else 1
    assert max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w)) <= tolerance


@pytest.mark.parametrize("channels,out_height", [(1, 17), (2, 13), (3, 17), (4, 13)])
def test_area_averaging_of_a_banded_image_equals_the_exact_reference(channels, out_height):
    # bands of equal rows (the same object, as decode_png gives Up-filtered repeats), some
    # ending on an odd row: halving takes shortcuts for runs of one row and for 2x2 blocks
    import random
    rnd = random.Random(channels)
    rows = []
    for length in (4, 1, 3, 2, 6, 1, 1, 5, 10):
        band = bytes(rnd.randrange(256) for _ in range(48 * channels))
        rows += [band] * length
    rows.append(bytes(band))                # equal, but another object
    got = imagen.resize_area(imagen.PngImage(48, len(rows), channels, rows), 24, out_height).rows
    assert got == exact_area_average_by_halves(rows, channels, out_height)


def exact_area_average_by_halves(rows, channels, out_height):
    """Area averaging to half the width, in exact fractions rounded half up (the float
    reference can land a hair below a .5)."""
    import math
    from fractions import Fraction
    height, out = len(rows), []
    for j in range(out_height):
        y0, y1 = Fraction(j * height, out_height), Fraction((j + 1) * height, out_height)
        weights = [(y, min(y1, y + 1) - max(y0, y)) for y in range(math.floor(y0), math.ceil(y1))]
        out.append(bytes(
            math.floor(sum(w * (rows[y][k + k // channels * channels] + rows[y][
                k + k // channels * channels + channels]) for y, w in weights)
                / (2 * (y1 - y0)) + Fraction(1, 2))
            for k in range(len(rows[0]) // 2)))
    return out


@pytest.mark.parametrize("channels,out_height", [(1, 12), (3, 12), (4, 7), (3, 48)])
def test_area_averaging_of_a_banded_image_to_a_quarter_equals_the_exact_reference(
        channels, out_height):
    # runs of equal rows that start and end with whole output rows are averaged alone
    import random
    rnd = random.Random(channels)
    rows = []
    for length in (8, 4, 3, 5, 12, 1, 7, 4, 4):
        band = bytes(rnd.randrange(256) for _ in range(48 * channels))
        rows += [band] * length
    got = imagen.resize_area(imagen.PngImage(48, len(rows), channels, rows), 12, out_height).rows
    assert got == exact_area_average(rows, channels, 4, out_height)


def exact_area_average(rows, channels, factor, out_height):
    """Area averaging to 1/factor of the width, in exact fractions rounded half up."""
    import math
    from fractions import Fraction
    height, out = len(rows), []
    for j in range(out_height):
        y0, y1 = Fraction(j * height, out_height), Fraction((j + 1) * height, out_height)
        weights = [(y, min(y1, y + 1) - max(y0, y)) for y in range(math.floor(y0), math.ceil(y1))]
        out.append(bytes(
            math.floor(sum(w * sum(rows[y][(k // channels * factor + t) * channels
                                           + k % channels] for t in range(factor))
                           for y, w in weights) / (factor * (y1 - y0)) + Fraction(1, 2))
            for k in range(len(rows[0]) // factor)))
    return out


@pytest.mark.parametrize("color,depth,channels", [(0, 8, 1), (4, 16, 2), (3, 8, 3), (6, 8, 4)])
def test_downscale_png_keeps_the_channels_and_fits_the_longest_side(color, depth, channels):
    import random
    rnd = random.Random(5)
    palette = [(v, 255 - v, v // 2) for v in range(256)] if color == 3 else None
    top = (1 << depth) - 1
    pixels = [[tuple(rnd.randrange(top + 1) for _ in range(SAMPLES[color])) for _ in range(700)]
              for _ in range(90)]
    small = imagen.downscale_png(make_png(pixels, color, depth, palette=palette), 512)
    image = imagen.decode_png(small)
    assert (image.width, image.height, image.channels) == (512, 66, channels)
    assert small[25] == imagen.PNG_COLOR_TYPES[channels]


@pytest.mark.parametrize("depth,trns,interlace,bands", [
    (8, False, False, (5, 1, 6, 3, 1, 8) + (1,) * 24), (8, True, False, (5, 1, 6, 3, 1, 8) * 2),
    (4, False, False, (8, 4, 3, 5, 12, 1, 7, 4, 4)), (8, True, True, (5, 1, 6, 3, 1, 8) * 2)])
def test_downscale_png_of_a_palette_image_averages_the_colours_of_its_indexes(depth, trns,
                                                                             interlace, bands):
    # downscale_png reads a palette image's indexes and looks them up as it sums them
    import random
    rnd = random.Random(depth)
    top = (1 << depth) - 1
    palette = [(rnd.randrange(256), rnd.randrange(256), rnd.randrange(256)) for _ in range(top + 1)]
    alpha = [rnd.randrange(256) for _ in range(top + 1)] if trns else None
    def band(run):  # in runs of `run` equal pixels, as pixel art scaled up
        return [pixel for pixel in [(rnd.randrange(top + 1),) for _ in range(96 // run)]
                for _ in range(run)]
    pixels = []
    for k, length in enumerate(bands):      # bands of equal rows, or rows all apart
        pixels += [band((4, 1, 2)[k % 3])] * length
    data = make_png(pixels, 3, depth, interlace, palette, alpha)
    rgb = imagen.decode_png(data)
    assert rgb.tables is None and rgb.channels == (4 if trns else 3)
    for side in (48, 24, 32):                   # halving, a factor of 4, of 3
        small = imagen.decode_png(imagen.downscale_png(data, side))
        want = imagen.resize_area(rgb, side, side * 48 // 96)
        assert (small.width, small.channels, small.rows) == (side, rgb.channels, want.rows)


def test_downscale_png_of_the_mock_image_is_its_exact_2x2_average():
    data = imagen.mock_png("a fox", 3, 1024, 1024)
    _, _, rows = decode_png(data)
    small = imagen.downscale_png(data, 512)
    width, height, got = decode_png(small)
    assert (width, height) == (512, 512)
    for y in (0, 7, 255, 511):
        a, b = rows[2 * y], rows[2 * y + 1]
        want = bytes((a[i] + a[i + 3] + b[i] + b[i + 3] + 2) // 4
                     for x in range(0, 1024 * 3, 6) for i in range(x, x + 3))
        assert got[y] == want


def test_encode_png_image_repeats_lines_and_the_independent_reader_agrees():
    a, b = bytes(range(0, 192)), bytes(range(63, 255))
    rows = [a, a, a, a, b, a, b, b, a] + [bytes(192)] * 40 + [b]
    data = imagen.encode_png_image(imagen.PngImage(64, len(rows), 3, rows))
    assert decode_png(data) == (64, len(rows), rows)      # zlib checks the adler32 too


def test_encode_png_image_compresses_a_line_once_only_where_long_runs_pay_for_the_flushes():
    a, b, c = bytes(range(0, 192)), bytes(range(63, 255)), bytes(range(1, 193))
    runs = imagen._scanline_runs
    long_runs = imagen.PngImage(64, 300, 3, [a] * 100 + [b] * 100 + [a] * 99 + [c])
    scattered = imagen.PngImage(64, 12, 3, [a, b, b, a, c, a, a, b, c, c, a, b])
    for image, blocks in ((long_runs, True), (scattered, False)):
        seen = {}
        for line, times in runs(image):
            seen[line] = seen.get(line, 0) + times
        assert imagen._blocks_pay(runs(image), seen) is blocks
        data = imagen.encode_png_image(image)
        assert decode_png(data) == (64, image.height, image.rows)     # and the adler32


def test_downscale_png_returns_an_image_that_already_fits_unchanged():
    data = imagen.mock_png("x", 1, 512, 300)
    assert imagen.downscale_png(data, 512) is data


# ===== Config =====

def test_config_init_prints_the_sample_file_exactly(run_main):
    with open(os.path.join(HERE, "imagen.sample.yaml")) as handle:
        assert run_main("config", "init").out == handle.read()


def test_sample_config_is_valid(run_main):
    run = run_main("--config", os.path.join(HERE, "imagen.sample.yaml"), "config", "validate")
    assert run.code == 0, run


def test_sample_config_validates_without_a_warning(run_main):
    run = run_main("--config", os.path.join(HERE, "imagen.sample.yaml"), "config", "validate")
    assert run.err == "" and run.out.endswith(": valid (0 warning(s))\n"), run


def test_config_path_follows_precedence(run_main, env, tmp_path):
    default = os.path.join(env["XDG_CONFIG_HOME"], "imagen.yaml")
    run = run_main("config", "path")
    assert run.out.strip() == default and "does not exist" in run.err
    run = run_main("config", "path", extra_env={"IMAGEN_CONFIG": "/x/env.yaml"})
    assert run.out.strip() == "/x/env.yaml"
    run = run_main("config", "path", "--config", "/x/flag.yaml", extra_env={"IMAGEN_CONFIG": "/x/e"})
    assert run.out.strip() == "/x/flag.yaml"


def test_missing_default_config_is_fine_but_missing_env_config_is_exit_2(run_main):
    assert run_main("generate", "x", "-o", "a.png").code == 0
    run = run_main("generate", "x", extra_env={"IMAGEN_CONFIG": "nope.yaml"})
    assert run.code == 2 and run.err == "imagen: config: nope.yaml: no such file\n"


def test_config_in_xdg_config_home_is_read(run_main, env):
    os.makedirs(env["XDG_CONFIG_HOME"])
    with open(os.path.join(env["XDG_CONFIG_HOME"], "imagen.yaml"), "w") as handle:
        handle.write("backends:\n  other:\n    adapter: mock\ndefault_backend: other\n")
    run = run_main("generate", "x", "--json", "-o", "a.png")
    assert json.loads(run.out)["backend"] == "other"


def test_yaml_syntax_error_names_file_line_and_column(run_main, write_config):
    path = write_config("output:\n  dir: [unclosed\n  naming: x\n")
    run = run_main("--config", path, "generate", "x")
    assert run.code == 2
    assert run.err.startswith("imagen: config: %s:3:" % path)


def test_validate_lists_every_problem_with_its_yaml_path(run_main, write_config):
    path = write_config(
        "default_backend: nope\n"
        "output:\n  sidecar: maybe\n  preview: sometimes\n"
        "backends:\n  m:\n    adapter: mock\n    timeout: -1\n    tiemout: 3\n"
        "  r:\n    adapter: warp\n"
        "  t:\n    adapter: mock\n    api_token: r8_abcdef123\n"
        "styles:\n  s:\n    size: 10x10\n")
    run = run_main("--config", path, "config", "validate")
    assert run.code == 2
    for expected in ["error: %s:1: default_backend: no backend named 'nope'" % path,
                     "error: %s:3: output.sidecar: must be true or false" % path,
                     "error: %s:4: output.preview: must be one of auto, on, off" % path,
                     "error: %s:8: backends.m.timeout: must be a number above 0" % path,
                     'warning: %s:9: backends.m.tiemout: unknown key (did you mean "timeout"?)' % path,
                     "error: %s:11: backends.r.adapter: unknown adapter 'warp'" % path,
                     "error: %s:14: backends.t.api_token: a token must not be written" % path,
                     "error: %s:17: styles.s.size: size 10x10 is out of range" % path]:
        assert expected in run.err
    assert "r8_abcdef123" not in run.err + run.out


def test_validate_of_a_good_config_exits_0_and_shows_warnings(run_main, write_config):
    path = write_config("outptu:\n  dir: /tmp\n")
    run = run_main("--config", path, "config", "validate")
    assert run.code == 0 and 'outptu: unknown key (did you mean "output"?)' in run.err


def test_unknown_keys_warn_on_generate_too(run_main, write_config):
    path = write_config("output:\n  sidcar: false\n")
    run = run_main("--config", path, "generate", "x", "-o", "a.png")
    assert run.code == 0 and 'output.sidcar: unknown key (did you mean "sidecar"?)' in run.err


def test_literal_token_in_config_is_an_error_on_generate(run_main, write_config):
    path = write_config("backends:\n  m:\n    adapter: mock\n    secret_key: hunter2\n")
    run = run_main("--config", path, "generate", "x")
    assert run.code == 2 and "backends.m.secret_key: a token must not be written" in run.err
    assert "hunter2" not in run.err


def test_token_env_names_are_allowed(run_main, write_config):
    assert not [p for p in imagen.validate_config({"backends": {"m": {
        "adapter": "mock", "api_token_env": "X"}}}, adapters=imagen.ADAPTERS) if "token" in p[2]]


def test_config_that_is_not_a_mapping_is_an_error(run_main, write_config):
    run = run_main("--config", write_config("- a\n- b\n"), "generate", "x")
    assert run.code == 2 and "must be a mapping" in run.err


@pytest.mark.parametrize("how", ["--config", "IMAGEN_CONFIG"])
def test_a_config_that_is_a_device_is_exit_2_naming_it(run_main, how):
    argv, extra = (["--config", "/dev/zero"], {}) if how == "--config" else ([], {"IMAGEN_CONFIG": "/dev/zero"})
    run = run_main(*argv + ["generate", "x", "-o", "a.png"], extra_env=extra)
    assert run.code == 2 and run.err == "imagen: config: /dev/zero: not a regular file\n"


def test_a_config_over_the_size_cap_is_exit_2(run_main, write_config):
    path = write_config("default_backend: mock\n" + "#" * imagen.MAX_CONFIG_BYTES + "\n")
    run = run_main("--config", path, "config", "validate")
    assert run.code == 2 and run.err == "imagen: config: %s: over the 1 MiB limit\n" % path


def test_a_config_that_is_a_fifo_is_refused_without_blocking(cli, tmp_path):
    os.mkfifo(str(tmp_path / "pipe.yaml"))
    run = cli("--config", "pipe.yaml", "config", "validate", timeout=20)
    assert run.code == 2 and run.err == "imagen: config: pipe.yaml: not a regular file\n"


def billion_laughs(keys=9, levels=7):
    """A few hundred bytes of YAML whose aliases expand to keys**levels values."""
    names = "abcdefghijklmnopqrstuvwxyz"[:keys]
    lines = ["l0: &l0 {%s}" % ", ".join("%s: lol" % n for n in names)]
    for level in range(1, levels + 1):
        lines.append("l%d: &l%d {%s}" % (level, level, ", ".join(
            "%s: *l%d" % (n, level - 1) for n in names)))
    return "\n".join(lines) + "\n"


def test_a_yaml_billion_laughs_is_refused_at_once(run_main, write_config):
    text = billion_laughs()
    assert len(text) < 800
    run = run_main("--config", write_config(text), "generate", "x", "-o", "a.png")
    assert run.code == 2 and run.err.count("\n") == 1
    assert run.err.startswith("imagen: config: %s:" % write_config(text)) and "aliases expand" in run.err


@pytest.mark.parametrize("text,message", [
    ("a: &a {b: *a}\n", "a recursive alias"),
    ("a: &a [1, *a]\n", "a recursive alias"),
    ("a: " + "[" * 20000 + "]" * 20000 + "\n", "nested too deeply"),
    ("a: " + "[" * 100 + "]" * 100 + "\n", "nested too deeply"),
    ("default_backend: mock\nx: a\x00b\n", "character #x0000 is not allowed"),
], ids=["mapping-cycle", "sequence-cycle", "20000-levels", "100-levels", "nul-byte"])
def test_hostile_yaml_is_exit_2_naming_the_file(run_main, write_config, text, message):
    path = write_config(text)
    run = run_main("--config", path, "generate", "x", "-o", "a.png")
    assert run.code == 2 and run.err.count("\n") == 1, run
    assert run.err.startswith("imagen: config: %s" % path) and message in run.err, run


@pytest.mark.parametrize("brackets,code", [(imagen.MAX_CONFIG_DEPTH - 1, 0),
                                            (imagen.MAX_CONFIG_DEPTH, 2)])
def test_config_nesting_is_refused_one_level_past_the_limit(run_main, write_config, brackets,
                                                            code):
    # the root mapping and its key are two levels: x's innermost list is brackets + 1
    path = write_config("x: " + "[" * brackets + "]" * brackets + "\n")
    run = run_main("--config", path, "config", "validate")
    assert run.code == code, run
    assert ("nested too deeply (at most %d levels" % imagen.MAX_CONFIG_DEPTH in run.err) == bool(code)


def test_aliases_in_a_config_work_and_each_path_is_validated(run_main, write_config):
    path = write_config("backends:\n  one: &m {adapter: mock, steps: 3, tiemout: 1}\n  two: *m\n"
                        "default_backend: two\n" + billion_laughs(keys=4, levels=4))
    run = run_main("--config", path, "generate", "x", "--json", "-o", "a.png")
    assert run.code == 0, run
    assert json.loads(run.out)["backend"] == "two"
    assert 'backends.one.tiemout: unknown key (did you mean "timeout"?)' in run.err
    assert 'backends.two.tiemout: unknown key' in run.err


def test_config_warnings_read_the_same_on_validate_and_on_other_commands(run_main, write_config):
    path = write_config("output:\n  sidcar: false\n")
    line = 'imagen: config: warning: %s:2: output.sidcar: unknown key (did you mean "sidecar"?)\n' % path
    assert run_main("--config", path, "config", "validate").err == line
    assert run_main("--config", path, "generate", "x", "-o", "a.png").err == line
    assert run_main("--config", path, "backends").err == line


def test_config_init_write_creates_the_file_and_its_directory_once(run_main, env):
    path = os.path.join(env["XDG_CONFIG_HOME"], "imagen.yaml")
    assert not os.path.exists(env["XDG_CONFIG_HOME"])
    run = run_main("config", "init", "--write")
    assert run.code == 0 and run.out == path + "\n"
    with open(path) as handle:
        assert handle.read() == imagen.SAMPLE_CONFIG
    with open(path, "w") as handle:
        handle.write("default_backend: mock\n")
    run = run_main("config", "init", "--write")
    assert run.code == 2 and run.out == ""
    assert run.err == "imagen: config: %s already exists; not overwritten\n" % path
    with open(path) as handle:
        assert handle.read() == "default_backend: mock\n"


def test_config_init_write_goes_where_config_points(run_main, tmp_path):
    run = run_main("--config", "new/dir/imagen.yaml", "config", "init", "--write")
    assert run.code == 0 and (tmp_path / "new" / "dir" / "imagen.yaml").read_text() == imagen.SAMPLE_CONFIG
    run = run_main("config", "validate", "--write")
    assert run.code == 2 and "--write goes with init" in run.err


# ===== backends and inspect =====

def test_backends_lists_adapters_and_instances_with_default_marked(run_main, write_config):
    path = write_config("default_backend: fast\nbackends:\n  fast:\n    adapter: mock\n")
    run = run_main("--config", path, "backends")
    assert run.code == 0
    assert run.lines[0].startswith("adapters: mock")
    rows = {line.split()[-4 + (not line.startswith("*"))]: line for line in run.lines[2:]}
    assert rows["fast"].startswith("* fast") and "usable" in rows["fast"]
    data = json.loads(run_main("--config", path, "backends", "--json").out)
    assert {b["name"]: b["default"] for b in data["backends"]} == {"fast": True, "mock": False}


def test_backends_show_which_take_input_images(run_main, write_config, tmp_path):
    path = write_config("backends:\n  r:\n    adapter: replicate\n    model: black-forest-labs/"
                        "flux-schnell\n  k:\n    adapter: replicate\n    model: black-forest-labs/"
                        "flux-2-pro\n  c:\n    adapter: comfyui\n    url: http://127.0.0.1:9\n")
    run = run_main("--config", path, "backends")
    assert run.lines[-1] == "input images (--image, edit): c (up to 1), k (up to 8), mock (up to 8)"
    data = json.loads(run_main("--config", path, "backends", "--json").out)
    assert {b["name"]: b["images"] for b in data["backends"]} == {"c": 1, "k": 8, "mock": 8, "r": 0}


def test_inspect_reads_embedded_record_and_sidecar(run_main, tmp_path):
    run_main("generate", "a fox", "--seed", "11", "-o", "f.png")
    info = json.loads(run_main("inspect", "f.png").out)
    assert info["embedded"]["seed"] == 11 and info["sidecar"]["seed"] == 11
    os.unlink(tmp_path / "f.png.json")
    info = json.loads(run_main("inspect", "f.png").out)
    assert info["embedded"]["prompt"] == "a fox" and info["sidecar"] is None


def test_inspect_of_a_foreign_or_missing_file_is_exit_2(run_main, tmp_path):
    (tmp_path / "plain.png").write_bytes(imagen.mock_png("x", 1, 64, 64))
    run = run_main("inspect", "plain.png")
    assert run.code == 2 and "no imagen metadata" in run.err
    assert run_main("inspect", "missing.png").code == 2
    (tmp_path / "text.png").write_text("hello")
    assert run_main("inspect", "text.png").code == 2


def test_inspect_of_a_device_or_a_file_over_the_cap_is_exit_2(run_main, tmp_path, monkeypatch):
    run = run_main("inspect", "/dev/zero")
    assert run.code == 2 and run.err == "imagen: inspect: /dev/zero: not a regular file\n"
    run_main("generate", "x", "-o", "f.png")
    monkeypatch.setattr(imagen, "MAX_INSPECT_BYTES", 1024)
    run = run_main("inspect", "f.png")
    assert run.code == 2 and run.err == "imagen: inspect: f.png: over the 1024-byte limit\n"


def test_inspect_of_a_fifo_is_refused_without_blocking(cli, tmp_path):
    os.mkfifo(str(tmp_path / "pipe.png"))
    run = cli("inspect", "pipe.png", timeout=20)
    assert run.code == 2 and run.err == "imagen: inspect: pipe.png: not a regular file\n"


def test_inspect_of_a_sidecar_that_is_a_fifo_is_refused_without_blocking(cli, tmp_path):
    cli("generate", "x", "-o", "f.png")
    os.unlink(str(tmp_path / "f.png.json"))
    os.mkfifo(str(tmp_path / "f.png.json"))
    run = cli("inspect", "f.png", timeout=20)
    assert run.code == 2 and run.err == "imagen: inspect: f.png.json: not a regular file\n"


def test_inspect_inflates_text_chunks_within_one_budget_for_the_file(run_main, tmp_path, monkeypatch):
    bomb = zlib.compress(b"x" * (imagen.MAX_PNG_TEXT + 1), 9)   # 16 KB that inflate to 16 MB
    chunks = b"".join(imagen.png_chunk(b"zTXt", key + b"\x00\x00" + bomb)
                      for key in [b"imagen", b"parameters", b"other"] * 20)
    (tmp_path / "bomb.png").write_bytes(imagen.png_insert_chunks(imagen.mock_png("x", 1, 64, 64), chunks))
    inflated = []
    real = zlib.decompressobj

    class Counting:
        def __init__(self, *args):
            self.inflater = real(*args)

        def decompress(self, data, max_length=0):
            out = self.inflater.decompress(data, max_length)
            inflated.append(len(out))
            return out

        def __getattr__(self, name):
            return getattr(self.inflater, name)

    monkeypatch.setattr(zlib, "decompressobj", Counting)
    run = run_main("inspect", "bomb.png")
    assert run.code == 2 and "no imagen metadata" in run.err
    assert sum(inflated) <= imagen.MAX_PNG_TEXT + 1


def test_inspect_warns_when_the_file_no_longer_matches_its_sidecar(run_main, tmp_path):
    run_main("generate", "a fox", "-o", "f.png")
    run = run_main("inspect", "f.png")
    assert run.err == "" and json.loads(run.out)["sidecar_matches"] is True
    data = (tmp_path / "f.png").read_bytes()
    (tmp_path / "f.png").write_bytes(data + b"trailing bytes")      # edited after generation
    run = run_main("inspect", "f.png")
    assert run.code == 0 and json.loads(run.out)["sidecar_matches"] is False
    assert run.err == ("imagen: inspect: f.png no longer matches its sidecar (sha256 differs): "
                       "changed since it was generated\n")
    os.unlink(str(tmp_path / "f.png.json"))
    assert json.loads(run_main("inspect", "f.png").out)["sidecar_matches"] is None


# ===== History and remix =====

def add_generations(env, *rows):
    """Ledger rows written directly: (id, created_at, prompt[, backend[, path]])."""
    with imagen.open_ledger(env) as ledger:
        for ident, created_at, prompt, *rest in rows:
            backend = rest[0] if rest else "mock"
            path = rest[1] if len(rest) > 1 else "/nowhere/%s.png" % ident
            ledger.add({"id": ident, "path": path, "backend": backend, "created_at": created_at,
                        "cost_usd": 0.0, "width": 64, "height": 64, "seed": 1,
                        "record": json.dumps({"id": ident, "prompt": prompt,
                                              "backend": backend})})


@pytest.fixture(params=["fts5", "like"])
def search_kind(request, monkeypatch):
    """Each search test runs with the FTS5 index and with the LIKE fallback."""
    if request.param == "like":
        monkeypatch.setattr(imagen, "SEARCH_USES_FTS5", False)
    return request.param


def test_history_words_all_match_the_prompt_whatever_case_and_accents(run_main, env,
                                                                      search_kind):
    for prompt in ("a red fox", "Un RENARD rôti près du fox-trot", "blue whale",
                   "FOX in snow", "crème brûlée"):
        assert run_main("generate", prompt, "--size", "64x64", "--no-sidecar").code == 0
    run = run_main("history", "fox")
    assert run.code == 0 and run.err == ""
    assert [line.split("  ")[-1] for line in run.lines] == [
        "FOX in snow", "Un RENARD rôti près du fox-trot", "a red fox"]
    assert [r.split("  ")[-1] for r in run_main("history", "ROTI", "Fox").lines] == [
        "Un RENARD rôti près du fox-trot"]
    assert [r.split("  ")[-1] for r in run_main("history", "creme", "BRULEE").lines] == [
        "crème brûlée"]
    assert run_main("history", "fox", "whale").lines == []
    assert len(run_main("history").lines) == 5
    if search_kind == "fts5":
        import sqlite3
        db = sqlite3.connect(imagen.ledger_path(env))
        assert db.execute("SELECT count(*) FROM generations_fts").fetchone()[0] == 5
        db.close()


def test_history_shows_id_time_backend_size_cost_path_and_marks_missing_files(run_main, env,
                                                                            tmp_path,
                                                                            monkeypatch):
    record = json.loads(run_main("generate", "a red fox " + "x" * 300, "--size", "64x96",
                                 "-o", "fox.png", "--json").out)
    monkeypatch.setenv("COLUMNS", "300")
    [line] = run_main("history").lines
    local = record["created_at"][:16].replace("T", " ")
    assert line.startswith("%s  %s  mock  64x96  $0.00  %s  a red fox x"
                           % (record["id"][:8], local, tmp_path / "fox.png"))
    assert len(line) == 300 and line.endswith("…")
    os.unlink(str(tmp_path / "fox.png"))
    monkeypatch.delenv("COLUMNS")        # not a terminal: whole lines
    [line] = run_main("history").lines
    assert "%s (missing)  a red fox" % (tmp_path / "fox.png") in line and line.endswith("x")


def test_history_json_is_the_record_plus_path_cloud_and_exists(run_main, tmp_path):
    run_main("generate", "a fox", "-o", "a.png", "--size", "64x64")
    run_main("generate", "a fox", "-o", "b.png", "--size", "64x64")
    os.unlink(str(tmp_path / "a.png"))
    rows = [json.loads(line) for line in run_main("history", "--json").lines]
    assert [(r["path"], r["exists"], r["cloud"]) for r in rows] == [
        (str(tmp_path / "b.png"), True, "off"), (str(tmp_path / "a.png"), False, "off")]
    assert list(rows[0])[:len(imagen.RECORD_FIELDS)] == list(imagen.RECORD_FIELDS)


def test_history_filters_by_since_backend_and_limit(run_main, env):
    add_generations(env, ("a1", "2026-01-01T10:00:00+00:00", "fox one"),
                    ("a2", "2026-02-01T10:00:00+00:00", "fox two", "remote"),
                    ("a3", "2026-03-01T10:00:00+00:00", "fox three"))
    ids = lambda *args: [json.loads(l)["id"] for l in run_main("history", "--json", *args).lines]
    assert ids() == ["a3", "a2", "a1"]
    assert ids("--since", "2026-02-01") == ["a3", "a2"]
    assert ids("--backend", "mock") == ["a3", "a1"]
    assert ids("--limit", "1", "fox") == ["a3"]
    assert ids("--since", "1d") == []
    run = run_main("history", "--since", "last week")
    assert run.code == 2 and run.err.startswith("imagen: history: --since must be a date")


def test_history_lines_import_neither_argparse_nor_json(env):
    """Their import (and that of `re` under both) was most of the time `history` takes."""
    add_generations(env, ("d1", "2026-01-01T10:00:00+00:00", "a red fox"),
                    ("d2", "2026-01-02T10:00:00+00:00", "a crème brûlée"))
    code = ("import sys, imagen\n"
            "code = imagen.main(['history', 'fox', '--limit', '5'])\n"
            "print(sorted({'argparse', 'json', 're'} & set(sys.modules)), code)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True,
                         text=True, timeout=60).stdout
    assert out.endswith("a red fox\n[] 0\n"), out


def test_history_lines_read_the_prompt_of_any_record_as_json_reads_it(env, monkeypatch):
    """SQLite gives the prompt where it reads JSON as Python does; Python reads the rest."""
    records = ['{"prompt": "a", "prompt": "twice fox"}', '{"prompt": "x\\ud800 fox"}',
               '{"pr\\u006fmpt": "escaped key fox"}', '{"prompt": "nul\\u0000 fox"}',
               '{"prompt": NaN}', '[1]', 'not json', '{"prompt": "cr\\u00e8me fox"}']
    with imagen.open_ledger(env) as ledger:
        for number, record in enumerate(records):
            ledger.add({"id": "e%d" % number, "path": "/nowhere/e.png", "backend": "mock",
                        "created_at": "2026-01-01T10:00:%02d+00:00" % number, "record": record})
    lines = []
    monkeypatch.setattr(imagen, "emit", lines.append)
    assert imagen.main(["history"], env=env) == 0
    assert [line.split("(missing)  ")[1] for line in lines] == [
        "crème fox", "", "", "nan", "nul\x00 fox", "escaped key fox", "x\ud800 fox", "twice fox"]


def test_search_history_pages_with_the_cursor_of_the_last_row(env):
    add_generations(env, *[("b%02d" % i, "2026-01-01T10:00:%02d+00:00" % (i // 2), "fox %d" % i)
                           for i in range(7)])
    seen, before = [], None
    while True:
        page = imagen.search_history(env, "fox", limit=3, before=before)
        if not page:
            break
        seen += [row["id"] for row in page]
        before = page[-1]["cursor"]
    assert seen == ["b%02d" % i for i in reversed(range(7))]
    assert set(page and page[0] or imagen.search_history(env, limit=1)[0]) >= {
        "id", "created_at", "backend", "path", "cloud", "exists", "record"}


def test_search_history_is_newest_first_by_time_when_rows_came_in_another_order(env,
                                                                               monkeypatch):
    # a search walks the newest rowids first: rows added out of time order (a ledger
    # merged, a clock set back), far apart, must still come in time order
    monkeypatch.setattr(imagen, "SEARCH_WALK", (2, 4))
    rows = [("d%03d" % i, "2026-01-01T10:%02d:%02d+00:00" % (i // 60, i % 60),
             "fox %d" % i if i % 3 == 0 else "owl %d" % i) for i in range(120)]
    late = [("owl", "2026-03-01T10:00:00+00:00", "a late owl"),
            ("late", "2026-02-01T10:00:00+00:00", "a late fox"),
            ("early", "2025-01-01T10:00:00+00:00", "an early fox")]
    add_generations(env, *(late[:2] + rows + late[2:]))
    foxes = ["late"] + ["d%03d" % i for i in reversed(range(0, 120, 3))] + ["early"]
    for limit in (1, 3, 5, 30, 50):
        assert [r["id"] for r in imagen.search_history(env, "fox", limit=limit)] == foxes[:limit]
    assert [r["id"] for r in imagen.search_history(env, "fox", limit=3, backend="mock",
                                                    since="2026-01-01")] == foxes[:3]
    seen, before = [], None
    while True:
        page = imagen.search_history(env, "fox", limit=7, before=before)
        seen += [row["id"] for row in page]
        if len(page) < 7:
            break
        before = page[-1]["cursor"]
    assert seen == foxes
    monkeypatch.setattr(imagen, "SEARCH_WALK", ())          # the query over every match
    assert [r["id"] for r in imagen.search_history(env, "fox", limit=5)] == foxes[:5]


def test_a_searched_word_spelled_out_as_the_indexed_words_it_starts_finds_what_its_prefix_finds(
        env, monkeypatch):
    prompts = ["a fox", "two Foxes", "foxglove", "a föx", "fo", "f00 fox", "a box", "Fox-trot"]
    prompts += ["ab%d fox" % i for i in range(imagen.SEARCH_MAX_TERMS + 1)]
    add_generations(env, *[("p%02d" % i, "2026-01-01T10:00:%02d+00:00" % i, prompt)
                           for i, prompt in enumerate(prompts)])
    with imagen.open_ledger(env) as ledger:
        found = lambda words: [r["id"] for r in imagen.search_history(env, words, ledger=ledger)]
        assert imagen.word_query(ledger, "Fox") == '"Fox"*'          # no index yet
        assert imagen.ensure_search_index(ledger)
        assert imagen.word_query(ledger, "Fox") == '("fox" OR "foxes" OR "foxglove")'
        ledger.db.execute("DELETE FROM generations WHERE id = 'p02'")    # foxglove: gone
        queries = ["fox", "FO", "foxe", "ab", "ab1", "abc", "f0", "föx", "fox-t", "x", "fox ab"]
        spelled = {q: found(q) for q in queries}
        assert imagen.word_query(ledger, "ab") == '"ab"*'            # more words than the cap
        assert imagen.word_query(ledger, "abc") == '("abc")'         # none: nothing matches
        assert imagen.word_query(ledger, "föx") == '"föx"*'          # left to the tokenizer
        monkeypatch.setattr(imagen, "SEARCH_MAX_TERMS", 0)          # every word a prefix
        assert imagen.word_query(ledger, "fox") == '"fox"*'
        assert {q: found(q) for q in queries} == spelled
    assert spelled["fox"] == ["p16", "p15", "p14", "p13", "p12", "p11", "p10", "p09", "p08",
                              "p07", "p05", "p03", "p01", "p00"]
    assert spelled["x"] == [] and spelled["ab1"] == ["p09"] and spelled["fox-t"] == ["p07"]


def test_the_search_index_is_built_on_first_use_of_an_existing_ledger_and_kept_in_step(
        run_main, env):
    import sqlite3
    add_generations(env, ("c1", "2026-01-01T10:00:00+00:00", "an old fox"))
    db = sqlite3.connect(imagen.ledger_path(env))
    tables = lambda: {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
    assert "generations_fts" not in tables()
    assert [r["id"] for r in imagen.search_history(env, ["fox"])] == ["c1"]
    assert "generations_fts" in tables()
    add_generations(env, ("c2", "2026-01-02T10:00:00+00:00", "a new fox"))
    db.execute("DELETE FROM generations WHERE id = 'c1'")
    db.commit()
    db.close()
    assert [r["id"] for r in imagen.search_history(env, ["fox"])] == ["c2"]


def test_inspect_takes_a_generation_id_a_unique_prefix_or_last(run_main, tmp_path):
    first = json.loads(run_main("generate", "a fox", "-o", "a.png", "--json").out)
    last = json.loads(run_main("generate", "a cat", "-o", "b.png", "--json").out)
    for ref in (first["id"], first["id"][:8].upper()):
        info = json.loads(run_main("inspect", ref).out)
        assert info["file"] == str(tmp_path / "a.png") and info["embedded"]["id"] == first["id"]
    assert json.loads(run_main("inspect", "last").out)["sidecar"]["id"] == last["id"]


def test_inspect_of_an_ambiguous_prefix_an_unknown_id_or_a_lost_file_is_one_line_exit_2(
        run_main, env):
    add_generations(env, ("abc1", "2026-01-01T10:00:00+00:00", "x"),
                    ("abc2", "2026-01-01T10:00:01+00:00", "y"))
    run = run_main("inspect", "abc")
    assert (run.code, run.out) == (2, "")
    assert run.err == ("imagen: inspect: id prefix 'abc' is ambiguous: it matches abc1, abc2; "
                       "give more characters\n")
    run = run_main("inspect", "fed")
    assert run.code == 2 and run.err == ("imagen: inspect: fed: no such file, and no "
                                         "generation with that id in the ledger\n")
    run = run_main("inspect", "abc2")
    assert run.code == 2 and run.err == ("imagen: inspect: abc2: generation abc2 was written "
                                         "to /nowhere/abc2.png, which no longer exists\n")


def test_a_mock_remix_with_the_same_backend_and_seed_reproduces_the_pixels(run_main,
                                                                           write_config,
                                                                           tmp_path):
    path = write_config("styles:\n  ink:\n    prompt: \"{prompt}, ink drawing\"\n")
    source = json.loads(run_main("--config", path, "generate", "a fox", "--style", "ink",
                                 "--size", "96x64", "-o", "a.png", "--json").out)
    parent = source
    for ref in ("a.png", "a.png.json", source["id"][:6], "last"):
        run = run_main("--config", path, "generate", "--from", ref, "-o", "b.png", "--json")
        assert run.code == 0, run
        remix = json.loads(run.out)
        assert remix["parent"] == parent["id"] and remix["id"] != parent["id"]
        parent = remix if ref == source["id"][:6] else source   # `last` is the one before
        for key in ("prompt", "final_prompt", "style", "backend", "seed", "requested_size"):
            assert remix[key] == source[key], key
        assert decode_png((tmp_path / "b.png").read_bytes()) == \
            decode_png((tmp_path / "a.png").read_bytes())


def test_remix_flags_override_the_source_and_seed_0_draws_anew(run_main, tmp_path):
    source = json.loads(run_main("generate", "a fox", "--seed", "7", "--steps", "3",
                                 "--negative", "blur", "-o", "a.png", "--json").out)
    remix = json.loads(run_main("generate", "--from", "a.png", "a wolf", "--size", "64x64",
                                "-o", "b.png", "--json").out)
    assert (remix["prompt"], remix["seed"], remix["negative"], remix["requested_size"]) == (
        "a wolf", 7, "blur", "64x64")
    remix = json.loads(run_main("generate", "--from", "last", "--seed", "0", "-o", "c.png",
                                "--json").out)
    assert remix["seed"] != 7 and remix["prompt"] == "a wolf"
    assert remix["parent"] != source["id"]      # the parent is the wolf, the last one


def test_remix_reads_the_parameters_text_of_another_tools_png(run_main, tmp_path):
    text = ("a castle on a hill,\nmisty morning\nNegative prompt: blurry, lowres\n"
            'Steps: 12, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 96x64, '
            'Lora hashes: "a: 1, b: 2", Model: sdxl')
    data = imagen.png_insert_chunks(solid_png(32, 32), imagen.png_text_chunk("parameters", text))
    (tmp_path / "foreign.png").write_bytes(data)
    record = json.loads(run_main("generate", "--from", "foreign.png", "-o", "b.png",
                                 "--json").out)
    assert (record["prompt"], record["negative"], record["seed"], record["requested_size"],
            record["parent"]) == ("a castle on a hill,\nmisty morning", "blurry, lowres",
                                  1234, "96x64", None)
    assert imagen.parse_parameters("a cat\nSteps: 4, Seed: 9")["seed"] == 9


def test_remix_of_an_unknown_source_is_one_line_exit_2(run_main, tmp_path):
    (tmp_path / "plain.png").write_bytes(solid_png(8, 8))
    for ref, message in (("nothing-here", "generate: --from: nothing-here: no such file, and "
                          "no generation with that id in the ledger"),
                         ("plain.png", "generate: --from plain.png: no imagen record and no "
                          "`parameters` text in it"),
                         ("last", "generate: --from: last: the ledger %s holds no generation "
                          "yet" % imagen.ledger_path(
                              {"XDG_DATA_HOME": str(tmp_path / "home/.local/share")}))):
        run = run_main("generate", "--from", ref)
        assert (run.code, run.out, run.err) == (2, "", "imagen: %s\n" % message)
    run = run_main("generate")
    assert run.code == 2 and "PROMPT (or --from SOURCE) is required" in run.err


# ===== Batch =====

import threading  # noqa: E402
import time  # noqa: E402


def batch_file(tmp_path, text, name="batch.txt"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def ledger_rows_if_any(env):
    """The ledger's rows, none while it is still being created."""
    import sqlite3
    try:
        return ledger_rows(env)
    except sqlite3.OperationalError:
        return []


def rows_by_key(env):
    found = {}
    for row in ledger_rows(env):
        found.setdefault(row["job_key"], []).append(row)
    return found


def test_batch_runs_every_line_prints_each_image_and_a_rerun_does_only_what_is_missing(
        run_main, env, tmp_path):
    path = batch_file(tmp_path, "a red fox\n\n# a comment\nblue whale\na green owl\n")
    run = run_main("batch", path, "--size", "64x64", "--seed", "5")
    assert run.code == 0, run
    assert sorted(os.path.basename(p) for p in run.lines) == [
        "a-green-owl-5.png", "a-red-fox-5.png", "blue-whale-5.png"]
    assert "[3/3] line" in run.err and "3 done, 0 failed, 0 running, 0 queued" in run.err
    keys = rows_by_key(env)
    assert len(keys) == 3 and None not in keys and all(len(r) == 1 for r in keys.values())
    os.unlink(run.lines[0])                       # a lost image is made again
    run = run_main("batch", path, "--size", "64x64", "--seed", "5")
    assert run.code == 0 and len(run.lines) == 1 and "2 already done" in run.err
    assert run_main("batch", path, "--size", "64x64", "--seed", "5").lines == []
    assert len(run_main("batch", path, "--size", "64x64", "--seed", "5", "--force").lines) == 3


def test_batch_json_lines_fields_override_the_flags_and_count_makes_several_jobs(
        run_main, write_config, tmp_path):
    config = write_config("backends:\n  other:\n    adapter: mock\n")
    path = batch_file(tmp_path, '{"prompt": "a fox", "count": 2, "seed": 10}\n'
                      '{"prompt": "an owl", "backend": "other", "size": "96x64"}\n')
    run = run_main("--config", config, "batch", path, "--size", "64x64", "--json")
    assert run.code == 0, run
    records = sorted((json.loads(line) for line in run.lines), key=lambda r: (r["line"], r["seed"]))
    assert [(r["line"], r["prompt"], r["seed"], r["backend"], r["requested_size"])
            for r in records[:2]] == [(1, "a fox", 10, "mock", "64x64"),
                                      (1, "a fox", 11, "mock", "64x64")]
    assert (records[2]["backend"], records[2]["requested_size"]) == ("other", "96x64")


@pytest.mark.parametrize("text,message", [
    ('{"prompt": "ok"}\n{"prompt": "x", "seed": "a"}\n', "line 2: seed must be int"),
    ('{"prompt": "ok"}\n\n{"prompt": "x", "colour": 1}\n', "line 3: unknown field 'colour'"),
    ('{"prompt": "ok"}\nnot json\n', "line 2: not a JSON object"),
    ('a fox\n   \nx\n', None),
    ('{"prompt": "ok"}\n{"prompt": "x", "size": "5x5"}\n', "line 2: size 5x5 is out of range"),
    ('{"prompt": "ok"}\n{"prompt": "x", "backend": "nope"}\n', "line 2: unknown backend 'nope'"),
    ('{"prompt": "   "}\n', "line 1: prompt is empty"),
])
def test_a_bad_batch_line_is_exit_2_naming_it_before_anything_runs(run_main, env, tmp_path,
                                                                   text, message):
    path = batch_file(tmp_path, text)
    run = run_main("batch", path, "--size", "64x64")
    if message is None:
        assert run.code == 0
        return
    assert (run.code, run.out) == (2, "")
    assert run.err.startswith("imagen: batch: %s %s" % (path, message)), run.err
    assert run.err.count("\n") == 1 and not os.path.exists(imagen.ledger_path(env))


def test_a_failed_batch_job_does_not_stop_the_others_and_the_exit_is_1_with_a_summary(
        run_main, write_config, tmp_path):
    config = write_config("backends:\n  broken:\n    adapter: mock\n    fail: out of paint\n")
    path = batch_file(tmp_path, '{"prompt": "a"}\n{"prompt": "b", "backend": "broken"}\n'
                      '{"prompt": "c"}\n')
    run = run_main("--config", config, "batch", path, "--size", "64x64")
    assert run.code == 1 and len(run.lines) == 2
    assert "imagen: batch: line 2: broken: out of paint\n" in run.err
    assert run.err.endswith("imagen: batch: 2 done, 1 failed (line 2); run the same batch "
                            "again to do only what is missing\n")


class CountingMock(imagen.MockAdapter):
    """The mock, counting how many of its jobs run at once (across instances). A job waits
    until `full` of them run at once (or every one of `jobs` has started), so that they do
    overlap however slowly threads start, then lingers 10 ms: time for a batch that breaks
    its limit to start one more."""
    NAME = "counting"
    now, most, started, full, jobs = 0, 0, 0, 1, 1
    lock = threading.Condition()

    def generate(self, request, deadline):
        with CountingMock.lock:
            CountingMock.now += 1
            CountingMock.started += 1
            CountingMock.most = max(CountingMock.most, CountingMock.now)
            CountingMock.lock.notify_all()
            if not CountingMock.lock.wait_for(lambda: CountingMock.now >= CountingMock.full
                                              or CountingMock.started == CountingMock.jobs,
                                              timeout=5):
                CountingMock.full = 0       # they never will: the test fails, no later job waits
        try:
            time.sleep(0.01)
            return super().generate(request, deadline)
        finally:
            with CountingMock.lock:
                CountingMock.now -= 1


@pytest.mark.parametrize("flags,limit,most", [((), 2, 2), (("-j", "1"), 3, 1), ((), None, 8)])
def test_batch_runs_at_most_j_jobs_and_max_concurrency_per_backend(run_main, write_config,
                                                                    tmp_path, monkeypatch,
                                                                    flags, limit, most):
    monkeypatch.setitem(imagen.ADAPTERS, "counting", CountingMock)
    monkeypatch.setattr(CountingMock, "MAX_CONCURRENCY", 8)
    monkeypatch.setattr(CountingMock, "most", 0)
    monkeypatch.setattr(CountingMock, "started", 0)
    monkeypatch.setattr(CountingMock, "full", most)
    monkeypatch.setattr(CountingMock, "jobs", 12)
    block = "    max_concurrency: %d\n" % limit if limit else ""
    config = write_config("backends:\n  c:\n    adapter: counting\n" + block)
    path = batch_file(tmp_path, "".join("fox %d\n" % i for i in range(12)))
    run = run_main("--config", config, "batch", path, "--backend", "c", "--size", "64x64",
                   *flags)
    assert run.code == 0 and len(run.lines) == 12
    assert CountingMock.most == most


def test_batch_spreads_over_comfyui_hosts_and_retries_a_failing_hosts_job_elsewhere(
        run_main, comfyui, write_config, tmp_path):
    good = [comfyui(job_seconds=0.05), comfyui(job_seconds=0.05)]
    bad = comfyui(fail=("3", "RuntimeError", "CUDA out of memory"))
    config = comfy_config(write_config, [bad.url, good[0].url, good[1].url, refused_url()])
    path = batch_file(tmp_path, "".join("fox %d\n" % i for i in range(8)))
    run = run_main("--config", config, "batch", path, "--size", "64x64")
    assert run.code == 0, run
    assert len(run.lines) == 8 and all(os.path.exists(p) for p in run.lines)
    assert run.err.count("it gets no job for now") == 1           # the refused host
    assert run.err.count("rests, the job goes to another host") == 1
    assert len(bad.posted_prompts()) == 1                         # rested after its failure
    assert all(fake.posted_prompts() for fake in good)


def test_batch_jobs_on_a_comfyui_host_share_one_websocket_and_one_http_connection(
        run_main, comfyui, write_config, tmp_path):
    hosts = [comfyui(), comfyui()]
    config = comfy_config(write_config, [host.url for host in hosts])
    path = batch_file(tmp_path, "".join("fox %d\n" % i for i in range(6)))
    run = run_main("--config", config, "batch", path, "--size", "64x64")
    assert run.code == 0 and len(run.lines) == 6, run
    client_ids = []
    for host in hosts:
        prompts = host.posted_prompts()
        assert prompts and len(host.ws_connects) == 1
        assert {prompt["client_id"] for prompt in prompts} == set(host.ws_connects)
        client_ids += host.ws_connects
        jobs = [r for r in host.requests if r.path != "/ws" and (r.method, r.path) != (
            "GET", "/prompt")]         # not the first look at the queue, on its own connection
        assert len({r.client_port for r in jobs}) == 1
    assert len(set(client_ids)) == 2


def test_batch_on_a_comfyui_host_whose_kept_websocket_dropped_opens_another(
        run_main, comfyui, write_config, tmp_path):
    def drop_once(prompt_id):      # the host's sockets cut as the second job starts
        if len(host.posted_prompts()) == 2 and not dropped:
            dropped.append(prompt_id)
            for peer in list(host.peers.values()):
                peer.drop()
        return True
    dropped = []
    host = comfyui(gate=drop_once)
    config = comfy_config(write_config, host.url)
    path = batch_file(tmp_path, "".join("fox %d\n" % i for i in range(3)))
    run = run_main("--config", config, "batch", path, "--size", "64x64")
    assert run.code == 0 and len(run.lines) == 3, run
    assert dropped and len(host.ws_connects) == 2


def test_batch_max_cost_stops_starting_paid_jobs_and_dry_run_shows_the_plan(
        run_main, write_config, tmp_path, monkeypatch):
    class PricedMock(PaidMock):
        def estimate_cost(self, images):
            return 0.003 * images
    monkeypatch.setitem(imagen.ADAPTERS, "paid-mock", PricedMock)
    config = write_config("backends:\n  paid:\n    adapter: paid-mock\n")
    path = batch_file(tmp_path, "".join("fox %d\n" % i for i in range(4)))
    run = run_main("--config", config, "batch", path, "--backend", "paid", "--size", "64x64",
                   "--dry-run")
    assert run.code == 0 and len(run.lines) == 4 and run.lines[0].startswith("line 1: paid 64x64")
    assert "4 job(s) from 4 line(s); estimated cost $0.012" in run.err
    assert not os.path.exists(tmp_path / "home" / "Pictures")
    run = run_main("--config", config, "batch", path, "--backend", "paid", "--size", "64x64",
                   "-j", "1", "--max-cost", "0.007")
    assert run.code == 1 and len(run.lines) == 2
    assert run.err.endswith("imagen: batch: 2 done, 2 not started: they would pass --max-cost "
                            "$0.007; run the same batch again to do only what is missing\n")


def test_a_batch_killed_mid_run_keeps_every_image_and_row_and_a_rerun_finishes_it(
        run_main, env, write_config, tmp_path, fake_clock):      # the clock of the rerun
    config = write_config("backends:\n  slow:\n    adapter: mock\n    delay: 0.1\n")
    path = batch_file(tmp_path, "".join("fox %d\n" % i for i in range(16)))
    argv = ["--config", str(config), "batch", path, "--backend", "slow", "--size", "64x64",
            "-j", "2"]
    proc = subprocess.Popen([sys.executable, IMAGEN] + argv, env=env, cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        poll(lambda: len(ledger_rows_if_any(env)) >= 4, timeout=20, message="some jobs done")
        proc.kill()
        printed = proc.communicate()[0].decode().split()
    finally:
        proc.kill()
    before = {row["id"]: row for row in ledger_rows(env)}
    assert 4 <= len(before) < 16
    assert all(os.path.exists(p) for p in printed) and set(printed) <= {
        row["path"] for row in before.values()}
    run = run_main(*argv)
    assert run.code == 0 and len(run.lines) == 16 - len(before)
    after = ledger_rows(env)
    assert all(before[i] == row for row in after for i in [row["id"]] if i in before)
    keys = rows_by_key(env)
    assert len(keys) == 16 and all(len(rows) == 1 for rows in keys.values())
    assert all(os.path.exists(row["path"]) for row in after)


def test_ctrl_c_cancels_a_batchs_running_jobs_at_the_backend_and_exits_130(comfyui, env,
                                                                           write_config,
                                                                           tmp_path):
    fake = comfyui(job_seconds=60)
    config = comfy_config(write_config, fake.url)
    path = batch_file(tmp_path, "a fox\nan owl\n")
    proc = popen_imagen(["--config", config, "batch", path, "--size", "64x64"], env=env,
                        cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ours = poll(lambda: fake.running, timeout=20, message="the first job running")
        err = interrupt(proc)
    finally:
        proc.kill()
        proc.wait()
    assert fake.job_cancels == [ours] and len(fake.posted_prompts()) == 1
    assert "imagen: batch: interrupted: 0 done" in err and "imagen: interrupted" in err
    assert "Traceback" not in err


# ===== Library use, start-up cost, distribution =====

def test_generate_is_importable_as_a_library(tmp_path, env):
    records = imagen.generate("a fox", output=str(tmp_path / "a.png"), seed=4, env=env,
                              config=imagen.load_config(env=env))
    assert records[0]["path"] == str(tmp_path / "a.png") and records[0]["seed"] == 4


def test_imagen_run_as_the_program_keeps_the_collector_off_its_imported_objects(env):
    """main() reading sys.argv freezes what the import made (walking it again cost every
    command 1 to 2 ms); main(argv), as a library or a test calls it, leaves gc alone."""
    code = ("import gc, sys, imagen\n"
            "before = gc.get_freeze_count()\n"
            "imagen.main(['version'])\n"
            "library = gc.get_freeze_count() - before\n"
            "sys.argv[1:] = ['version']\n"
            "imagen.main()\n"
            "print(library, gc.get_freeze_count() - before > 1000)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True,
                         text=True, timeout=60).stdout
    assert out.endswith("0 True\n"), out


def test_mock_path_imports_no_network_database_or_yaml_module(env, tmp_path):
    code = ("import sys, imagen\n"
            "code = imagen.main(['generate', 'x', '-o', %r])\n"
            "bad = {'ssl', 'urllib', 'urllib.request', 'http.client', 'http.server', 'yaml'}\n"
            "print(sorted(bad & set(sys.modules)), code)\n" % str(tmp_path / "a.png"))
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True,
                         text=True, timeout=60).stdout
    assert out.strip().endswith("[] 0")


def make_pyz(pyz, build):
    """`make pyz` into `pyz`, built in `build`: tests that run at once never share a folder."""
    subprocess.run(["make", "-s", "pyz", "PYZ=%s" % pyz, "PYZ_BUILD=%s" % build], cwd=HERE,
                   check=True, capture_output=True, timeout=300)


def test_zipapp_runs_from_another_directory(tmp_path, env):
    pyz = tmp_path / "imagen.pyz"
    make_pyz(pyz, tmp_path / "build")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = subprocess.run([sys.executable, str(pyz), "generate", "x", "-o", "a.png"],
                         cwd=str(elsewhere), env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert (elsewhere / "a.png").exists()
    run = subprocess.run([sys.executable, str(pyz), "version"], cwd=str(elsewhere), env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.stdout.startswith("imagen %s" % imagen.__version__)


def test_zipapp_and_imagen_py_name_one_version_build_after_build(tmp_path, env):
    versions = set()
    for build in ("one", "two"):
        pyz = tmp_path / build / "imagen.pyz"
        make_pyz(pyz, tmp_path / build / "build")
        run = subprocess.run([sys.executable, str(pyz), "version"], env=env,
                             capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
        versions.add(run.stdout)
    run = subprocess.run([sys.executable, IMAGEN, "version"], env=env, capture_output=True,
                         text=True, timeout=60, cwd=str(tmp_path))
    assert versions == {run.stdout} and re.match(r"imagen \S+ \([0-9a-f]{8}\)\n$", run.stdout)
    subprocess.run([sys.executable, str(pyz), "generate", "x", "-o", "a.png"], env=env,
                   check=True, capture_output=True, timeout=60, cwd=str(tmp_path))
    sidecar = json.loads((tmp_path / "a.png.json").read_text())
    assert "imagen " + sidecar["imagen_version"] + "\n" == run.stdout


def test_make_pyz_needs_no_venv_and_no_package_index(tmp_path):
    plan = subprocess.run(["make", "-n", "pyz", "PYZ=%s" % (tmp_path / "x.pyz")], cwd=HERE,
                          check=True, capture_output=True, text=True, timeout=60).stdout
    assert ".venv" not in plan and "pip" not in plan and "zipapp" in plan


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The prefix of one `make install` (its byte-compiling costs a third of a second)."""
    prefix = tmp_path_factory.mktemp("prefix")
    subprocess.run(["make", "-s", "install", "PREFIX=%s" % prefix], cwd=HERE, check=True,
                   capture_output=True, timeout=120)
    return prefix


def test_make_install_puts_a_working_launcher_under_prefix(installed, tmp_path, env):
    run = subprocess.run([str(installed / "bin" / "imagen"), "version"], env=env,
                         capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert run.returncode == 0 and run.stdout.startswith("imagen ")


def test_installed_launcher_never_runs_modules_from_the_current_directory(installed, tmp_path,
                                                                          env):
    prefix = installed
    work = tmp_path / "work"
    work.mkdir()
    for decoy in ("imagen.py", "yaml.py"):
        (work / decoy).write_text("print('decoy ran')\nraise SystemExit(3)\n")
    (work / "imagen.yaml").write_text("default_backend: mock\n")
    launcher = str(prefix / "bin" / "imagen")
    for argv in (["version"], ["--config", "imagen.yaml", "generate", "x", "-o", "a.png"]):
        run = subprocess.run([launcher] + argv, env=env, capture_output=True, text=True,
                             timeout=60, cwd=str(work))
        assert run.returncode == 0 and "decoy" not in run.stdout + run.stderr, run
    assert (work / "a.png").exists()


# ===== imagen schema, on a real PostgreSQL =====
# `imagen schema` applied to a Supabase-like database (conftest: roles, auth.uid(), storage
# tables), and rows sent through a PostgREST fake answered by that database, so types,
# NOT NULL, unique ids, RLS and grants are the real database's verdict.

from conftest import FakeSupabase, PgError, PostgresTables, PostgrestError  # noqa: E402


def image_row(owner, **changes):
    """An imagen.images row shaped like the one cloud sync sends (SPEC §8)."""
    import uuid
    row = {"id": str(uuid.uuid4()), "owner_user_id": owner,
           "storage_path": "2026-05-11/a-red-fox-42.png", "prompt": "a red fox",
           "prompt_sha256": "ab" * 32, "backend": "mock", "model": "mock-gradient",
           "seed": 42, "steps": 4, "width": 1024, "height": 1024, "latency_ms": 12,
           "cost_usd": 0.003, "sidecar": {"schema": "imagen/1", "seed": 42}, "tags": [],
           "created_at": "2026-05-11T01:51:09+02:00"}
    row.update(changes)
    return row


def usage_row(**changes):
    import uuid
    row = {"id": str(uuid.uuid4()), "created_at": "2026-05-11T01:51:09+02:00",
           "backend": "flux-dev-replicate", "model": "black-forest-labs/flux-dev",
           "latency_ms": 5321, "cost_usd": 0.025, "prompt_sha256": "cd" * 32, "caller": "tester"}
    row.update(changes)
    return row


@pytest.fixture
def owner(supabase_db):
    """A fresh auth.users id: rows of other tests never belong to it."""
    import uuid
    user = str(uuid.uuid4())
    supabase_db.sql("insert into auth.users (id) values ('%s')" % user)
    return user


@pytest.fixture(scope="module")
def tables(supabase_db):
    """The fake PostgREST's rows in supabase_db, as the service role (tables.as_role(...)
    for a signed-in user or anon)."""
    return PostgresTables(supabase_db)


@pytest.fixture
def rest(http_fake, tables):
    """Send a PostgREST request with the service key to a FakeSupabase whose rows are in
    supabase_db; returns (status, json body or None, headers)."""
    import urllib.error
    import urllib.request
    fake = FakeSupabase(http_fake, tables=tables)

    def send(method, path, body=None, headers=None):
        all_headers = {"apikey": fake.key, "Content-Type": "application/json",
                       "Authorization": "Bearer " + fake.key}
        all_headers.update(headers or {})
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(fake.url + "/rest/v1/" + path, data=data,
                                         headers=all_headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, raw, got = response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as exc:
            status, raw, got = exc.code, exc.read(), dict(exc.headers)
        return status, (json.loads(raw) if raw else None), got
    return send


def insert_image(rest, row, prefer="return=minimal,resolution=ignore-duplicates"):
    return rest("POST", "images?on_conflict=id", row,
                headers={"Content-Profile": "imagen", "Prefer": prefer})


def images_seen_by(tables, user, *filters):
    """The images rows a request signed in as `user` (None: anon) gets back."""
    caller = tables.as_role("authenticated", {"sub": user}) if user else tables.as_role("anon")
    rows, _ = caller.select("imagen", "images", None, list(filters),
                            [("storage_path", False)], 0, 1000)
    return rows


def test_schema_prints_idempotent_sql_for_both_tables_the_bucket_and_the_api(run_main):
    run = run_main("schema")
    assert run.code == 0 and run.err == ""
    sql = run.out
    for expected in ('create schema if not exists "imagen"', 'create schema if not exists "mai"',
                     'create table if not exists "imagen"."images"',
                     'create table if not exists "mai"."imagen_usage"',
                     "enable row level security", "owner_user_id = (select auth.uid())",
                     "insert into storage.buckets", "'imagen-generated'",
                     "grant usage on schema", "Exposed schemas",
                     "notify pgrst, 'reload schema'"):
        assert expected in sql, expected
    assert sql == imagen.schema_sql(imagen.DEFAULT_CLOUD)
    lines = [line.strip() for line in sql.splitlines()]
    for number, line in enumerate(lines):
        if line.startswith("create policy"):      # re-created, so a second run is safe
            assert lines[number - 1] == line.replace("create", "drop", 1).replace(
                "policy", "policy if exists", 1) + ";"
        elif line.startswith("create "):
            assert " if not exists " in line


def test_schema_follows_the_configured_tables_and_bucket(run_main, write_config):
    path = write_config("cloud:\n  bucket: art-bucket\n  images_table: art.pictures\n"
                        "  usage_table: art.costs\n")
    run = run_main("--config", path, "schema")
    assert run.code == 0, run
    assert '"art"."pictures"' in run.out and '"art"."costs"' in run.out
    assert '"imagen"' not in run.out and '"mai"' not in run.out
    assert run.out.count('create schema if not exists "art"') == 1
    assert "values ('art-bucket', 'art-bucket', false)" in run.out


@pytest.mark.parametrize("name", ["images", "Imagen.Images", "a.b.c", "imagen.images; drop"])
def test_schema_refuses_a_table_that_is_not_schema_dot_table(run_main, write_config, name):
    run = run_main("--config", write_config("cloud:\n  images_table: %r\n" % name), "schema")
    assert run.code == 2 and run.out == ""
    assert run.err.startswith("imagen: cloud.images_table must be schema.table")


@pytest.mark.parametrize("bucket", ["it's", "a$b", "", "x" * 64])
def test_schema_refuses_a_bucket_name_storage_would_not_take(run_main, write_config, bucket):
    run = run_main("--config", write_config("cloud:\n  bucket: %r\n" % bucket), "schema")
    assert run.code == 2 and run.err.startswith("imagen: cloud.bucket must be")


def test_schema_applies_to_a_fresh_project_and_a_second_run_changes_nothing(new_database):
    db = new_database()
    sql = imagen.schema_sql(imagen.DEFAULT_CLOUD)
    db.server.psql(sql, db=db.name)
    first = db.server.dump_schema(db.name)
    db.server.psql(sql, db=db.name)
    assert db.server.dump_schema(db.name) == first
    assert db.value("select count(*) from storage.buckets where id = 'imagen-generated' "
                    "and not public") == "1"


def test_schema_run_again_on_a_project_of_an_older_imagen_lets_seed_be_null(new_database):
    db = new_database()
    sql = imagen.schema_sql(imagen.DEFAULT_CLOUD)
    older = "\n".join(line for line in sql.replace(
        "  seed          bigint check", "  seed          bigint not null check").splitlines()
        if "drop not null" not in line)         # the schema before the openai backend
    assert older.count("not null check (seed") == 1
    db.server.psql(older, db=db.name)
    assert db.value("select is_nullable from information_schema.columns where "
                    "table_name = 'images' and column_name = 'seed'") == "NO"
    db.server.psql(sql, db=db.name)
    assert db.value("select is_nullable from information_schema.columns where "
                    "table_name = 'images' and column_name = 'seed'") == "YES"


def test_schema_for_other_names_applies_too_even_reserved_words(new_database):
    db = new_database()
    db.server.psql(imagen.schema_sql({"images_table": "public.order", "bucket": "pics.v2",
                                      "usage_table": "user.select"}), db=db.name)
    assert db.value("select count(*) from public.order") == "0"
    assert db.value("select relrowsecurity from pg_class where oid = 'user.select'::regclass") == "t"
    assert db.value("select public from storage.buckets where id = 'pics.v2'") == "f"


def test_schema_still_makes_the_tables_where_storage_objects_is_not_ours(new_database):
    """Newer Supabase projects: the SQL editor's role may not own storage.objects, and
    creating a policy on it fails. The tables and the bucket must still be made."""
    db = new_database()
    db.server.psql("do $$ begin if not exists (select from pg_roles where rolname = 'editor') "
                   "then create role editor login; end if; end $$")
    db.sql("grant create on database %s to editor; grant usage on schema auth, storage to "
           "editor; grant references on auth.users to editor; grant select, insert on "
           "storage.buckets to editor" % db.name)
    _, messages = db.server.psql_output(imagen.schema_sql(imagen.DEFAULT_CLOUD), db.name,
                                        user="editor")
    assert "WARNING:  01000: imagen: storage policies not created (must be owner of" in messages
    assert db.value("select count(*) from imagen.images") == "0"
    assert db.value("select count(*) from storage.buckets") == "1"


def test_schema_columns_have_the_types_imagen_needs(supabase_db):
    types = dict(line.split("|") for line in supabase_db.value(
        "select table_name || '.' || column_name, data_type || ':' || is_nullable "
        "from information_schema.columns where table_schema in ('imagen', 'mai')").splitlines())
    assert types["images.seed"] == "bigint:YES"       # null: a backend without seeds (openai)
    assert types["images.cost_usd"] == "numeric:YES" and types["imagen_usage.cost_usd"] == "numeric:YES"
    assert types["images.sidecar"] == "jsonb:NO" and types["images.tags"] == "ARRAY:NO"
    assert types["images.id"] == "uuid:NO" and types["images.owner_user_id"] == "uuid:NO"
    assert types["images.created_at"] == "timestamp with time zone:NO"
    assert types["imagen_usage.created_at"] == "timestamp with time zone:NO"
    assert "imagen_usage.prompt" not in types and types["imagen_usage.caller"] == "text:NO"
    indexes = supabase_db.value("select indexdef from pg_indexes where schemaname in "
                                "('imagen', 'mai')")
    assert "(owner_user_id, created_at)" in indexes and "(created_at, id)" in indexes


def test_a_row_like_cloud_sync_sends_is_stored_exactly_and_a_retry_is_ignored(rest, owner,
                                                                             supabase_db):
    prompt = "l'été d'un \"renard\" ☃ \\ %s $$"        # quotes and escapes survive
    row = image_row(owner, seed=2 ** 63 - 1, cost_usd=0.003, prompt=prompt)
    assert insert_image(rest, row)[:2] == (201, None)
    assert insert_image(rest, dict(row, prompt="a retry"))[0] == 201
    stored = supabase_db.json("select row_to_json(i) from imagen.images i where id = '%s'"
                              % row["id"])
    assert stored["seed"] == 2 ** 63 - 1 and stored["prompt"] == prompt
    assert stored["cost_usd"] == 0.003 and supabase_db.value(
        "select cost_usd::text from imagen.images where id = '%s'" % row["id"]) == "0.003"
    assert stored["sidecar"] == row["sidecar"] and stored["tags"] == []
    assert stored["created_at"] == "2026-05-10T23:51:09+00:00"


def test_return_representation_gives_back_the_stored_row(rest, owner):
    row = image_row(owner)
    row.pop("tags")
    status, body, _ = insert_image(rest, row, prefer="return=representation")
    assert status == 201 and body[0]["id"] == row["id"] and body[0]["tags"] == []


def test_a_duplicate_id_without_ignore_duplicates_is_409_23505(rest, owner):
    row = image_row(owner)
    assert insert_image(rest, row)[0] == 201
    status, body, _ = insert_image(rest, row, prefer="return=minimal")
    assert status == 409 and body["code"] == "23505" and "already exists" in body["details"]


def test_a_row_without_a_seed_is_stored_with_a_null_seed(rest, owner, supabase_db):
    row = image_row(owner, seed=None, sidecar={"schema": "imagen/1", "seed": None})
    assert insert_image(rest, row)[0] == 201
    assert supabase_db.value("select seed is null from imagen.images where id = '%s'"
                             % row["id"]) == "t"


def test_a_seed_above_bigint_is_400_22003(rest, owner):
    status, body, _ = insert_image(rest, image_row(owner, seed=2 ** 63))
    assert status == 400 and body["code"] == "22003" and "bigint" in body["message"]


@pytest.mark.parametrize("column", ["owner_user_id", "storage_path", "prompt_sha256", "sidecar"])
def test_a_missing_required_column_is_400_23502(rest, owner, column):
    row = image_row(owner)
    row.pop(column)
    status, body, _ = insert_image(rest, row)
    assert status == 400 and body["code"] == "23502" and column in body["message"]


@pytest.mark.parametrize("changes", [{"sidecar": '{"schema": "imagen/1"}'},
                                     {"prompt_sha256": "not a hash"}, {"seed": -1}])
def test_values_imagen_never_sends_are_refused_by_a_check(rest, owner, changes):
    status, body, _ = insert_image(rest, image_row(owner, **changes))
    assert status == 400 and body["code"] == "23514"


def test_an_owner_missing_from_auth_users_is_409_23503(rest):
    import uuid
    status, body, _ = insert_image(rest, image_row(str(uuid.uuid4())))
    assert status == 409 and body["code"] == "23503"


def test_unknown_column_table_and_schema_give_postgrest_errors(rest, owner):
    status, body, _ = insert_image(rest, image_row(owner, colour="red"))
    assert (status, body["code"]) == (400, "PGRST204") and "'colour'" in body["message"]
    status, body, _ = rest("POST", "nope", {}, headers={"Content-Profile": "imagen"})
    assert (status, body["code"]) == (404, "PGRST205")
    status, body, _ = rest("POST", "images", {}, headers={"Content-Profile": "secret"})
    assert (status, body["code"]) == (406, "PGRST106") and body["message"] == "Invalid schema: secret"


def test_owner_reads_only_their_own_rows_others_and_anon_see_none(rest, tables, supabase_db):
    import uuid
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    supabase_db.sql("insert into auth.users (id) values ('%s'), ('%s')" % (alice, bob))
    mine = [image_row(alice, storage_path="2026-05-11/a-%d.png" % n) for n in range(2)]
    for row in mine + [image_row(bob)]:
        assert insert_image(rest, row)[0] == 201
    assert [r["id"] for r in images_seen_by(tables, alice)] == [r["id"] for r in mine]
    assert images_seen_by(tables, str(uuid.uuid4()), ("owner_user_id", "eq", alice)) == []
    with pytest.raises(PostgrestError) as anon:
        images_seen_by(tables, None)
    assert anon.value.status == 401 and anon.value.body["code"] == "42501"
    status, rows, _ = rest("GET", "images?select=id&owner_user_id=eq." + alice,
                           headers={"Accept-Profile": "imagen"})
    assert status == 200 and len(rows) == 2


def test_a_signed_in_user_cannot_write_rows_only_the_service_role_can(tables, owner):
    user = tables.as_role("authenticated", {"sub": owner})
    for schema, table, row in (("imagen", "images", image_row(owner)),
                               ("mai", "imagen_usage", usage_row())):
        with pytest.raises(PostgrestError) as refused:
            user.insert(schema, table, [row], "id", True)
        assert refused.value.status == 403 and refused.value.body["code"] == "42501"


def test_a_usage_row_is_accepted_and_readable_only_with_the_service_key(rest, tables, owner):
    row = usage_row()
    headers = {"Content-Profile": "mai", "Prefer": "resolution=ignore-duplicates"}
    assert rest("POST", "imagen_usage?on_conflict=id", row, headers=headers)[0] == 201
    assert rest("POST", "imagen_usage?on_conflict=id", row, headers=headers)[0] == 201
    query = "imagen_usage?select=id,cost_usd,caller&id=eq." + row["id"]
    status, rows, _ = rest("GET", query, headers={"Accept-Profile": "mai"})
    assert status == 200 and rows == [{"id": row["id"], "cost_usd": 0.025, "caller": "tester"}]
    with pytest.raises(PostgrestError) as refused:
        tables.as_role("authenticated", {"sub": owner}).select(
            "mai", "imagen_usage", None, [], [], 0, 1000)
    assert refused.value.status == 403 and refused.value.body["code"] == "42501"


def test_grants_give_each_api_role_exactly_its_part(supabase_db):
    def can(role, privilege, table):
        return supabase_db.value("select has_table_privilege('%s', '%s', '%s')"
                                 % (role, table, privilege)) == "t"
    for schema in ("imagen", "mai"):
        assert all(supabase_db.value("select has_schema_privilege('%s', '%s', 'usage')"
                                     % (role, schema)) == "t"
                   for role in ("anon", "authenticated", "service_role"))
    assert can("authenticated", "select", "imagen.images")
    assert not can("authenticated", "insert", "imagen.images")
    assert not can("anon", "select", "imagen.images") and not can("anon", "select", "mai.imagen_usage")
    assert not can("authenticated", "select", "mai.imagen_usage")
    assert all(can("service_role", p, t) for p in ("select", "insert")
               for t in ("imagen.images", "mai.imagen_usage"))


def test_storage_policies_let_an_owner_upsert_and_read_only_their_objects(supabase_db, owner, rest):
    import uuid
    other = str(uuid.uuid4())
    supabase_db.sql("insert into auth.users (id) values ('%s')" % other)
    me = {"role": "authenticated", "sub": owner}
    upsert = ("insert into storage.objects (bucket_id, name, owner_id) values "
              "('imagen-generated', '%s', '%s') on conflict (bucket_id, name) "
              "do update set metadata = '{}'")
    mine, theirs = "2026-05-11/%s.png" % owner, "2026-05-11/%s.png" % other
    supabase_db.sql(upsert % (mine, owner), role="authenticated", claims=me)
    supabase_db.sql(upsert % (mine, owner), role="authenticated", claims=me)    # upsert again
    with pytest.raises(PgError) as refused:
        supabase_db.sql(upsert % (theirs, other), role="authenticated", claims=me)
    assert refused.value.sqlstate == "42501"
    supabase_db.sql(upsert % (theirs, other), role="authenticated",
                    claims={"role": "authenticated", "sub": other})
    with pytest.raises(PgError) as refused:     # someone else's object: no update for me
        supabase_db.sql(upsert % (theirs, owner), role="authenticated", claims=me)
    assert refused.value.sqlstate == "42501"
    synced = "2026-05-11/synced-%s.png" % owner     # uploaded by imagen with the service key
    supabase_db.sql("insert into storage.objects (bucket_id, name) values ('imagen-generated', "
                    "'%s')" % synced, role="service_role")
    assert insert_image(rest, image_row(owner, storage_path=synced))[0] == 201
    visible = supabase_db.value("select string_agg(name, ',' order by name) from storage.objects",
                                role="authenticated", claims=me)
    assert sorted(visible.split(",")) == sorted([mine, synced])
    assert supabase_db.value("select count(*) from storage.objects", role="anon") == "0"


# ===== tmux preview window and caller identity =====
# A real tmux server per test (conftest `tmux`), imagen told it runs in its `work` pane
# the way tmux tells a pane's processes ($TMUX, $TMUX_PANE), and a recording preview tool.

def preview_window(tmux):
    """The one window imagen added to `work`, checking it left the original one active."""
    windows = tmux.windows()
    assert len(windows) == 2, windows
    original, added = windows
    assert original["active"] and not added["active"]
    return added


def fake_tmux(tmp_path, body):
    """A `tmux` on PATH that writes a mark file when run, then runs `body`."""
    bin_dir = tmp_path / "fake-tmux"
    bin_dir.mkdir()
    write_script(bin_dir / "tmux", 'touch "%s"\n%s\n' % (tmp_path / "tmux-ran", body))
    return str(bin_dir) + os.pathsep + os.environ["PATH"]


def test_preview_opens_a_background_window_in_the_callers_session(run_main, tmux, preview_tool,
                                                                  tmp_path):
    run = run_main("generate", "a red fox", "-o", "fox.png", "--size", "64x64", "--preview",
                   extra_env=tmux.caller_env)
    assert run.code == 0 and run.err == ""
    window = preview_window(tmux)
    path = str(tmp_path / "fox.png")
    assert window["name"] == "img:a-red-fox"
    assert "tmux-img --hold %s" % path in window["command"]
    assert preview_tool.argv() == ["--hold", path]
    assert len(tmux.windows("other")) == 1     # not the session tmux thinks is current


def test_preview_path_with_spaces_and_quotes_reaches_the_tool_intact(run_main, tmux,
                                                                      preview_tool, tmp_path):
    path = tmp_path / "it's a \"quoted\" dir" / "my $HOME `x` image.png"
    run = run_main("generate", "x", "-o", path, "--size", "64x64", "--preview",
                   extra_env=tmux.caller_env)
    assert run.code == 0, run
    assert preview_tool.argv() == ["--hold", str(path)]
    assert preview_window(tmux)["name"] == "img:x"


def test_preview_command_without_path_placeholder_gets_the_path_appended(
        run_main, tmux, preview_tool, write_config, tmp_path):
    config = write_config('output:\n  preview_command: "tmux-img --fit"\n')
    run = run_main("--config", config, "generate", "x", "-o", "a b.png", "--size", "64x64",
                   "--preview", extra_env=tmux.caller_env)
    assert run.code == 0, run
    assert preview_tool.argv() == ["--fit", str(tmp_path / "a b.png")]


def test_count_opens_one_window_for_the_last_image(run_main, tmux, preview_tool, tmp_path):
    run = run_main("generate", "fox", "--count", "3", "-o", "fox.png", "--size", "64x64",
                   "--preview", extra_env=tmux.caller_env)
    assert run.code == 0 and len(run.lines) == 3
    assert preview_window(tmux)["name"] == "img:fox"
    assert preview_tool.argv() == ["--hold", str(tmp_path / "fox-3.png")]


def generate_in_pane(env, tmux, tmp_path, stdout):
    return subprocess.run(LAUNCHER + ["generate", "x", "-o", "a.png", "--size",
                                      "64x64"], stdout=stdout, stderr=subprocess.PIPE, text=True,
                          env=dict(env, **tmux.caller_env), cwd=str(tmp_path), timeout=60)


def test_auto_previews_when_stdout_is_a_terminal_inside_tmux(env, tmux, preview_tool,
                                                              tmp_path):
    master, slave = pty.openpty()
    try:
        done = generate_in_pane(env, tmux, tmp_path, stdout=slave)
    finally:
        os.close(slave)
        os.close(master)
    assert done.returncode == 0 and done.stderr == ""
    assert preview_tool.argv() == ["--hold", str(tmp_path / "a.png")]
    assert preview_window(tmux)["name"] == "img:x"


def test_auto_does_not_preview_when_stdout_is_not_a_terminal(env, tmux, preview_tool, tmp_path):
    done = generate_in_pane(env, tmux, tmp_path, stdout=subprocess.PIPE)
    assert done.returncode == 0 and done.stdout.strip() == str(tmp_path / "a.png")
    assert len(tmux.windows()) == 1 and not preview_tool.ran()   # new-window is synchronous


MODES = (None, "auto", "on", "off")


@pytest.mark.parametrize("flag", (None, "--preview", "--no-preview"))
@pytest.mark.parametrize("from_env", MODES)
@pytest.mark.parametrize("from_config", MODES)
def test_preview_precedence_config_then_env_then_flag(from_config, from_env, flag, env,
                                                      shared_tmux, write_config, tmp_path):
    tmux = shared_tmux
    config = write_config("output:\n  preview: %s\n" % from_config) if from_config else None
    if from_env:
        env["IMAGEN_PREVIEW"] = from_env
    flag_mode = {"--preview": "on", "--no-preview": "off"}.get(flag)
    mode = [m for m in ("auto", from_config, from_env, flag_mode) if m][-1]
    windows = 1
    for terminal in (False, True):
        imagen.generate("x", env=dict(env, **tmux.caller_env), console=imagen.Console(),
                        config=str(config) if config else None, preview=flag_mode,
                        interactive=terminal, output=str(tmp_path / "a.png"), size="64x64")
        windows += mode == "on" or (mode == "auto" and terminal)
        assert len(tmux.windows()) == windows, (mode, terminal)


@pytest.mark.parametrize("how", ("flag", "env", "config"))
def test_preview_on_outside_tmux_is_exit_2_before_anything_is_written(how, run_main,
                                                                      write_config, tmp_path):
    args, extra = ["--preview"], {}
    if how == "env":
        args, extra = [], {"IMAGEN_PREVIEW": "on"}
    elif how == "config":
        args = ["--config", write_config("output:\n  preview: on\n")]
    run = run_main(*(["generate", "x", "-o", "out/a.png"] + args), extra_env=extra)
    assert run.code == 2 and run.out == ""
    assert run.err == ("imagen: preview is on, but this is not inside tmux ($TMUX is not "
                       "set); use --no-preview or IMAGEN_PREVIEW=auto\n")
    assert not (tmp_path / "out").exists()


def test_bad_imagen_preview_value_is_exit_2_even_with_a_flag(run_main, tmp_path):
    run = run_main("generate", "x", "-o", "a.png", "--no-preview",
                   extra_env={"IMAGEN_PREVIEW": "maybe"})
    assert run.code == 2
    assert run.err == "imagen: IMAGEN_PREVIEW must be auto, on or off (got 'maybe')\n"
    assert listing(tmp_path) == []


def test_bad_preview_config_values_are_config_errors(run_main, write_config):
    config = write_config('output:\n  preview: sometimes\n  preview_command: "tmux-img \'{path}"\n')
    run = run_main("--config", config, "config", "validate")
    assert run.code == 2
    assert "output.preview: must be one of auto, on, off" in run.err
    assert "output.preview_command: cannot split" in run.err and "No closing quotation" in run.err


def test_missing_tmux_is_one_warning_and_the_image_stays(run_main, env, preview_tool, tmp_path):
    run = run_main("generate", "x", "-o", "a.png", "--size", "64x64", "--preview",
                   extra_env={"TMUX": "/tmp/no-such-socket,1,0", "TMUX_PANE": "%0",
                              "PATH": preview_tool.bin})
    assert run.code == 0 and run.out == str(tmp_path / "a.png") + "\n"
    assert run.err == "imagen: preview: tmux is not installed (not on PATH)\n"
    assert (tmp_path / "a.png").exists() and (tmp_path / "a.png.json").exists()


def test_missing_preview_tool_is_one_warning_and_no_window(run_main, tmux, tmp_path):
    path_without_tool = tmux.env["PATH"].split(os.pathsep, 1)[1]
    run = run_main("generate", "x", "-o", "a.png", "--size", "64x64", "--preview",
                   extra_env=dict(tmux.caller_env, PATH=path_without_tool))
    assert run.code == 0 and (tmp_path / "a.png").exists()
    assert run.err == "imagen: preview: tmux-img not found on PATH (output.preview_command)\n"
    assert len(tmux.windows()) == 1


def test_tmux_error_is_one_warning_and_the_image_stays(run_main, env, tmp_path, preview_tool):
    need_tool("tmux", "tmux")
    gone = tmp_path / "gone.sock"
    run = run_main("generate", "x", "-o", "a.png", "--size", "64x64", "--preview",
                   extra_env={"TMUX": "%s,1,0" % gone, "TMUX_PANE": "%0",
                              "PATH": preview_tool.bin + os.pathsep + env["PATH"]})
    assert run.code == 0 and (tmp_path / "a.png").exists()
    assert run.err.startswith("imagen: preview: tmux display-message: ")
    assert str(gone) in run.err and len(run.err.splitlines()) == 1


def test_a_hung_tmux_is_one_warning_after_a_bounded_wait(run_main, env, tmp_path, fake_clock):
    fake_clock.real_wait = 0.02              # then the whole timeout counts as waited out
    (tmp_path / "tmux-img").write_text("")   # any program on PATH passes the check
    (tmp_path / "tmux-img").chmod(0o755)
    path = fake_tmux(tmp_path, "exec sleep 30") + os.pathsep + str(tmp_path)
    run = run_main("generate", "x", "-o", "a.png", "--size", "64x64", "--preview",
                   extra_env={"TMUX": "/tmp/x,1,0", "TMUX_PANE": "%0", "PATH": path})
    assert run.code == 0 and (tmp_path / "a.png").exists()
    assert run.err == "imagen: preview: tmux did not answer within 2s\n"
    # who asked (1 s at most), then the preview's tmux command (2 s), each waited out
    assert fake_clock.expired == [imagen.CALLER_TIMEOUT, imagen.TMUX_TIMEOUT] == [1.0, 2.0]


# ----- caller identity -----

def caller_of(run_main, **extra_env):
    run = run_main("generate", "x", "-o", "a.png", "--size", "64x64", "--json",
                   extra_env=extra_env)
    assert run.code == 0, run
    return json.loads(run.out)["caller"]


def test_caller_is_the_panes_mai_name_inside_tmux(run_main, tmux, tmp_path):
    tmux.set_caller_name("agent-blue")
    assert caller_of(run_main, **tmux.caller_env) == "agent-blue"
    sidecar = json.loads((tmp_path / "a.png.json").read_text())
    assert sidecar["caller"] == "agent-blue"


def test_mai_from_id_beats_the_pane_name(run_main, tmux):
    tmux.set_caller_name("agent-blue")
    assert caller_of(run_main, MAI_FROM_ID="agent-7", **tmux.caller_env) == "agent-7"


def test_caller_is_the_login_name_in_a_pane_without_mai_name(run_main, tmux):
    assert caller_of(run_main, **tmux.caller_env) == "tester"


def test_caller_is_the_login_name_when_tmux_cannot_answer(run_main, tmp_path):
    need_tool("tmux", "tmux")
    assert caller_of(run_main, TMUX="%s,1,0" % (tmp_path / "gone"), TMUX_PANE="%0") == "tester"


def test_outside_tmux_imagen_never_runs_tmux(env, tmp_path):
    env["PATH"] = fake_tmux(tmp_path, "exit 1")
    records = imagen.generate("x", env=env, interactive=True, output=str(tmp_path / "a.png"),
                              size="64x64")
    assert records[0]["caller"] == "tester"
    assert not (tmp_path / "tmux-ran").exists()


def test_a_hung_tmux_delays_the_caller_by_at_most_a_second(env, tmp_path, fake_clock):
    fake_clock.real_wait = 0.02              # then the whole timeout counts as waited out
    env.update(PATH=fake_tmux(tmp_path, "exec sleep 30"), TMUX="/tmp/x,1,0", TMUX_PANE="%0")
    assert imagen.resolve_caller(env) == "tester"
    # tmux was started (so found on PATH) and given a second before imagen went on
    assert fake_clock.expired == [1.0]

# ===== Adapter: comfyui =====
# Against FakeComfyUI (conftest.py), which speaks the protocol of APIS.md §1.

from conftest import (FakeComfyUI, encode_multipart, png_size, refused_url, solid_png,  # noqa: E402
                      ws_accept_for, ws_frame, ws_read_frame)


def comfy_config(write_config, url, **options):
    """A config with one comfyui backend `flux`; url may be a list."""
    lines = ["default_backend: flux", "backends:", "  flux:", "    adapter: comfyui"]
    lines.append("    url: %s" % (json.dumps(url) if isinstance(url, list) else url))
    lines += ["    %s: %s" % (key, json.dumps(value)) for key, value in options.items()]
    return write_config("\n".join(lines) + "\n")


def comfy_generate(run_main, config, *args):
    run = run_main("--config", config, "generate", "a red fox", "--json", "-o", "fox.png", *args)
    return run, (json.loads(run.out) if run.code == 0 else None)


class Asked:
    """One request imagen made, as it asked for it: `at` and `deadline` on imagen's clock,
    `timeout` the most any of its attempts could take."""

    def __init__(self, method, url, deadline, timeout, at):
        from urllib.parse import urlsplit
        self.method, self.path = method, urlsplit(url).path
        self.deadline, self.timeout, self.at = deadline, timeout, at


@pytest.fixture
def asked(monkeypatch):
    """Every HTTP request and WebSocket connect (method "WS") imagen makes, as an Asked, in
    order: what a test of a deadline asserts instead of timing imagen on the wall clock."""
    calls = []
    request, connect = imagen.HttpClient.request, imagen.WebSocket.connect.__func__

    def spy(self, method, url, body=None, headers=None, deadline=None, retry=None,
            timeout=None, context=None):
        calls.append(Asked(method, url, deadline, timeout or self.timeout, imagen.clock.monotonic()))
        return request(self, method, url, body, headers, deadline, retry, timeout, context)

    def spy_connect(cls, url, timeout=10.0, env=None):
        at = imagen.clock.monotonic()
        calls.append(Asked("WS", url, at + timeout, timeout, at))
        return connect(cls, url, timeout, env)
    monkeypatch.setattr(imagen.HttpClient, "request", spy)
    monkeypatch.setattr(imagen.WebSocket, "connect", classmethod(spy_connect))
    return calls


@pytest.fixture
def expire_when(fake_clock, monkeypatch):
    """expire_when(fake, condition, seconds): once imagen waits on its WebSocket with
    condition() holding (not while it still reads an HTTP answer, which the jump would
    time out instead), a thread moves fake_clock on by `seconds` and wakes imagen through
    the FakeComfyUI `fake`, to see its deadline gone by at once."""
    import threading
    triggers = []
    recv = imagen.WebSocket.recv

    def watched(self, timeout=None):
        for condition, waiting in triggers:
            if condition():
                waiting.set()
        return recv(self, timeout)
    monkeypatch.setattr(imagen.WebSocket, "recv", watched)

    def start(fake, condition, seconds):
        waiting = threading.Event()
        triggers.append((condition, waiting))

        def expire():
            if waiting.wait(20):
                fake_clock.advance(seconds)
                fake.wake_clients()
        threading.Thread(target=expire, daemon=True).start()
    return start


def user_workflow(tmp_path, workflow, name="workflow.json"):
    path = tmp_path / name
    path.write_text(json.dumps(workflow))
    return str(path)


TWO_OUTPUTS = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": "{{width}}", "height": "{{height}}",
                                                 "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "{{filename_prefix}}",
                                                "images": ["1", 0]}},
    "3": {"class_type": "EmptyImage", "inputs": {"width": 96, "height": 64, "batch_size": 1,
                                                 "color": 255}},
    "4": {"class_type": "SaveImage", "inputs": {"filename_prefix": "second", "images": ["3", 0]}},
    "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "{{prompt}}, and {{negative}}",
                                                     "clip": "{{negative}}", "seed": "{{seed}}"}},
}


class TTYBuffer:
    """A stderr stand-in that says it is a terminal, so progress is shown."""

    def __init__(self):
        self.parts = []

    def write(self, text):
        self.parts.append(text)

    def flush(self):
        pass

    def isatty(self):
        return True

    @property
    def text(self):
        return "".join(self.parts)


def test_comfyui_builtin_flux_schnell_workflow_gets_typed_values(comfyui, run_main, write_config):
    fake = comfyui()
    run, record = comfy_generate(run_main, comfy_config(write_config, fake.url),
                                 "--seed", "42", "--size", "512x256")
    assert run.code == 0, run
    workflow = fake.workflow()
    kinds = {info["class_type"]: info["inputs"] for info in workflow.values()}
    assert kinds["CheckpointLoaderSimple"] == {"ckpt_name": "flux1-schnell-fp8.safetensors"}
    sampler = kinds["KSampler"]
    assert (sampler["seed"], sampler["steps"], sampler["cfg"]) == (42, 4, 1.0)
    assert (sampler["sampler_name"], sampler["scheduler"], sampler["denoise"]) == ("euler", "simple", 1.0)
    assert (kinds["EmptySD3LatentImage"]["width"], kinds["EmptySD3LatentImage"]["height"]) == (512, 256)
    assert [i["inputs"]["text"] for k, i in sorted(workflow.items()) if i["class_type"] == "CLIPTextEncode"] \
        == ["a red fox", ""]
    assert kinds["SaveImage"]["filename_prefix"] == "imagen"
    assert (record["width"], record["height"], record["model"]) == (512, 256, "flux1-schnell-fp8.safetensors")
    assert record["adapter"] == "comfyui" and record["steps"] == 4 and record["seed"] == 42


def test_comfyui_sends_the_client_id_it_listens_with(comfyui, run_main, write_config):
    fake = comfyui()
    run, record = comfy_generate(run_main, comfy_config(write_config, fake.url))
    posted = fake.posted_prompts()[0]
    assert posted["client_id"] and fake.ws_connects == [posted["client_id"]]
    meta = record["backend_meta"]
    assert meta["prompt_id"] == posted["prompt_id"] and meta["host"] == fake.url
    assert meta["wait"] == "websocket" and meta["client_id"] == posted["client_id"]


def test_comfyui_prompt_id_answered_with_a_wrong_type_is_not_used(comfyui, run_main, write_config):
    fake = comfyui()
    accept = fake.post_prompt
    fake.post_prompt = lambda raw: (lambda status, headers, body: (
        status, headers, dict(body, prompt_id={"not": "an id"})))(*accept(raw))
    run, record = comfy_generate(run_main, comfy_config(write_config, fake.url), "--timeout", "5")
    assert run.code == 0, run
    assert record["backend_meta"]["prompt_id"] == fake.posted_prompts()[0]["prompt_id"]


def test_comfyui_websocket_frames_are_masked_and_pings_answered(comfyui, run_main, write_config):
    fake = comfyui()   # sends `executed` in three fragments with a ping between them
    run, record = comfy_generate(run_main, comfy_config(write_config, fake.url))
    assert run.code == 0, run
    assert fake.pongs == [b"are you there"] and fake.unmasked == 0


def test_comfyui_seed_is_always_sent_even_when_drawn(comfyui, run_main, write_config):
    fake = comfyui()
    run, record = comfy_generate(run_main, comfy_config(write_config, fake.url))
    seed = next(i["inputs"]["seed"] for i in fake.workflow().values() if i["class_type"] == "KSampler")
    assert seed == record["seed"] and 1 <= seed <= 2 ** 32 - 1


def test_comfyui_model_names_the_checkpoint_and_steps_come_from_the_block(comfyui, run_main, write_config):
    fake = comfyui(checkpoints=["other.safetensors"])
    config = comfy_config(write_config, fake.url, model="other.safetensors", steps=2)
    run, record = comfy_generate(run_main, config)
    assert run.code == 0, run
    workflow = fake.workflow()
    assert workflow["4"]["inputs"]["ckpt_name"] == "other.safetensors"
    assert workflow["3"]["inputs"]["steps"] == 2 and record["model"] == "other.safetensors"


def test_comfyui_size_is_rounded_to_16_pixels_and_the_actual_size_recorded(comfyui, run_main, write_config):
    fake = comfyui()
    run, record = comfy_generate(run_main, comfy_config(write_config, fake.url), "--size", "1000x500")
    assert fake.workflow()["5"]["inputs"]["width"] == 1008
    assert (record["width"], record["height"], record["requested_size"]) == (1008, 496, "1000x500")


def test_comfyui_user_workflow_placeholders_are_filled_typed(comfyui, run_main, write_config, tmp_path):
    fake = comfyui()
    config = comfy_config(write_config, fake.url, workflow=user_workflow(tmp_path, TWO_OUTPUTS))
    run, record = comfy_generate(run_main, config, "--seed", "7", "--size", "128x80",
                                 "--negative", "blurry")
    assert run.code == 0, run
    workflow = fake.workflow()
    assert workflow["1"]["inputs"]["width"] == 128 and workflow["1"]["inputs"]["height"] == 80
    assert workflow["5"]["inputs"]["seed"] == 7
    assert workflow["2"]["inputs"]["filename_prefix"] == "imagen"
    # only strings that are exactly a placeholder are replaced
    assert workflow["5"]["inputs"]["text"] == "{{prompt}}, and {{negative}}"
    assert workflow["5"]["inputs"]["clip"] == "blurry"
    assert "FLUX ignores" not in run.err        # the note is for the built-in FLUX workflow
    # the first SaveImage node is the result: 128x80, not node 4's 96x64
    assert (record["width"], record["height"]) == (128, 80)
    assert record["backend_meta"]["output_node"] == "2"
    assert record["model"] == "workflow:workflow.json"


def test_comfyui_workflow_without_seed_or_with_unknown_placeholders_warns(comfyui, run_main,
                                                                          write_config, tmp_path):
    fake = comfyui()
    workflow = {"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64,
                                                             "batch_size": 1, "color": "{{sed}}"}},
                "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x", "images": ["1", 0]}}}
    config = comfy_config(write_config, fake.url, workflow=user_workflow(tmp_path, workflow))
    run, _ = comfy_generate(run_main, config)
    assert run.code == 1 and "Failed to convert an input value to a INT value" in run.err
    assert "imagen: flux: workflow placeholders left as written (unknown): {{sed}}\n" in run.err
    assert "imagen: flux: the workflow has no {{seed}}: the seed recorded is not the one it uses\n" \
        in run.err


def test_comfyui_output_node_chooses_the_image(comfyui, run_main, write_config, tmp_path):
    fake = comfyui()
    config = comfy_config(write_config, fake.url, workflow=user_workflow(tmp_path, TWO_OUTPUTS),
                          output_node="4")
    run, record = comfy_generate(run_main, config)
    assert run.code == 0, run
    assert (record["width"], record["height"]) == (96, 64)
    assert record["backend_meta"]["output_node"] == "4"


@pytest.mark.parametrize("content,options,message", [
    (None, {}, "workflow.json: No such file"),
    ("{not json", {}, "is not JSON"),
    ("[" * 100000 + "]" * 100000, {}, "is not JSON"),
    (json.dumps({"nodes": [], "links": []}), {}, "is in ComfyUI's UI format"),
    (json.dumps([1, 2]), {}, "is not in API format"),
    (json.dumps(TWO_OUTPUTS), {"output_node": "42"}, "output_node 42 is not a node of the workflow"),
])
def test_comfyui_bad_workflow_is_exit_2_before_any_request(comfyui, run_main, write_config, tmp_path,
                                                           content, options, message):
    fake = comfyui()
    if content is not None:
        (tmp_path / "workflow.json").write_text(content)
    config = comfy_config(write_config, fake.url, workflow=str(tmp_path / "workflow.json"), **options)
    run, _ = comfy_generate(run_main, config)
    assert run.code == 2 and message in run.err and run.err.count("\n") == 1
    assert fake.requests == []


def test_comfyui_workflow_that_is_a_device_or_over_the_cap_is_exit_2_before_any_request(
        comfyui, run_main, write_config, tmp_path, monkeypatch):
    fake = comfyui()
    run, _ = comfy_generate(run_main, comfy_config(write_config, fake.url, workflow="/dev/zero"))
    assert run.code == 2 and run.err.startswith("imagen: flux: workflow /dev/zero: not a regular file")
    monkeypatch.setattr(imagen, "MAX_WORKFLOW_BYTES", 100)
    run, _ = comfy_generate(run_main, comfy_config(write_config, fake.url,
                                                   workflow=user_workflow(tmp_path, TWO_OUTPUTS)))
    assert run.code == 2 and "workflow.json: over the 100-byte limit" in run.err
    assert fake.requests == []


def test_comfyui_negative_prompt_note_is_printed_once(comfyui, run_main, write_config):
    fake = comfyui()
    run = run_main("--config", comfy_config(write_config, fake.url), "generate", "x",
                   "--negative", "blurry", "--count", "2", "-o", "a.png")
    assert run.code == 0, run
    assert run.err.count("FLUX ignores the negative prompt") == 1
    assert len(fake.posted_prompts()) == 2


def test_comfyui_validation_error_names_node_and_input(comfyui, run_main, write_config, tmp_path):
    fake = comfyui(checkpoints=[])
    run, _ = comfy_generate(run_main, comfy_config(write_config, fake.url))
    assert run.code == 1 and run.err.count("\n") == 1
    assert run.err.startswith("imagen: flux: ComfyUI rejected the workflow: Prompt outputs failed "
                              "validation; node 4 (CheckpointLoaderSimple) input ckpt_name: Value "
                              "not in list: ckpt_name: 'flux1-schnell-fp8.safetensors' not in []")
    assert not (tmp_path / "fox.png").exists() and fake.deleted == []


def test_comfyui_invalid_prompt_error_is_shown_in_the_servers_words(comfyui, run_main, write_config, tmp_path):
    fake = comfyui()
    workflow = {"1": {"class_type": "NoSuchNode", "inputs": {}}}
    config = comfy_config(write_config, fake.url, workflow=user_workflow(tmp_path, workflow))
    run, _ = comfy_generate(run_main, config)
    assert run.code == 1
    assert "Cannot execute because node NoSuchNode does not exist. (Node ID '#1')" in run.err


def test_comfyui_wrong_typed_rejection_is_still_shown_in_one_line(comfyui, run_main, write_config):
    fake = comfyui(reject={"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt "
                                     "outputs failed validation", "details": ["x"]},
                           "node_errors": {"9": {"errors": 5, "class_type": "SaveImage"},
                                           "4": {"errors": [{"message": 7, "extra_info": 5}, "odd"]}}})
    run, _ = comfy_generate(run_main, comfy_config(write_config, fake.url))
    assert (run.code, run.err) == (1, "imagen: flux: ComfyUI rejected the workflow: Prompt outputs failed "
                                      "validation (['x']); node 4 (?): 7; node 4 (?): odd; node 9 "
                                      "(SaveImage): invalid\n")


def test_comfyui_queue_answer_of_the_wrong_shape_places_nothing():
    assert imagen.queue_place({"queue_running": 5, "queue_pending": "ab"}, "P") is None
    assert imagen.queue_place({"queue_running": [[0, "P"]], "queue_pending": 7}, "P") == ("running", 0)
    assert imagen.queue_place({"queue_running": {}, "queue_pending": [[3, "P"], 9]}, "P") == ("pending", 0)


def test_comfyui_500_text_plain_is_reported_as_the_server_said(comfyui, run_main, write_config):
    fake = comfyui(trouble=True)
    run, _ = comfy_generate(run_main, comfy_config(write_config, fake.url))
    assert run.code == 1
    assert run.err == ("imagen: flux: %s/prompt: HTTP 500: 500 Internal Server Error Server got "
                       "itself in trouble\n" % fake.url)


def test_fake_comfyui_answers_a_malformed_body_with_500_text_plain(comfyui):
    import urllib.request
    fake = comfyui()
    for body in (b"{not json", b"", b'{"prompt": [1]}'):
        request = urllib.request.Request(fake.url + "/api/prompt", data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=10)
        assert error.value.code == 500
        assert error.value.headers["Content-Type"].startswith("text/plain")
        assert error.value.read().decode().endswith("Server got itself in trouble")


def test_comfyui_execution_error_gives_the_exception_message(comfyui, run_main, write_config, tmp_path):
    fake = comfyui(fail=("3", "torch.OutOfMemoryError", "Allocation on device 0 would exceed allowed memory."))
    run, _ = comfy_generate(run_main, comfy_config(write_config, fake.url))
    assert run.code == 1
    assert run.err == ("imagen: flux: ComfyUI failed at node 3 (KSampler): torch.OutOfMemoryError: "
                       "Allocation on device 0 would exceed allowed memory.\n")
    assert listing(tmp_path) == ["imagen.yaml"]


@pytest.mark.parametrize("patch,message", [
    ({"status": {"status_str": "error", "completed": False, "messages": 5}},
     "ComfyUI reports an error without details"),
    ({"status": {"status_str": "error", "completed": False, "messages": {"a": 1}}},
     "ComfyUI reports an error without details"),
    ({"outputs": {"9": {"images": "x"}}}, "no image in the outputs of node 9 (nodes with outputs: 9)"),
    ({"outputs": {"9": {"images": [{"filename": "x.png", "subfolder": 5}]}}},
     "no image in the outputs of node 9 (nodes with outputs: 9)"),
    ({"outputs": {"9": {"images": [{"filename": "x.png", "type": ["output"]}]}}},
     "no image in the outputs of node 9 (nodes with outputs: 9)"),
], ids=["messages 5", "messages object", "images string", "subfolder 5", "type list"])
def test_comfyui_wrong_typed_history_fields_are_a_clear_backend_error(comfyui, run_main, write_config,
                                                                      patch, message):
    fake = comfyui(history_patch=patch)
    run, _ = comfy_generate(run_main, comfy_config(write_config, fake.url))
    assert (run.code, run.err) == (1, "imagen: flux: %s\n" % message)


def test_comfyui_connection_refused_names_the_url_quickly(run_main, write_config, fake_clock):
    url = refused_url()
    run, _ = comfy_generate(run_main, comfy_config(write_config, url))
    assert run.code == 1 and run.err == "imagen: flux: %s: connection refused\n" % url
    assert fake_clock.offset < 1.0           # it slept no long backoff before saying so


def test_comfyui_timeout_is_honoured_and_cancels_our_prompt(comfyui, run_main, write_config, tmp_path,
                                                            fake_clock, expire_when, asked):
    fake = comfyui(job_seconds=30, jobs=False)     # an older server: /queue delete + /interrupt
    expire_when(fake, lambda: fake.running, 1.5)
    started = fake_clock.monotonic()
    run, _ = comfy_generate(run_main, comfy_config(write_config, fake.url), "--timeout", "1.5")
    prompt_id = fake.posted_prompts()[0]["prompt_id"]
    assert run.code == 1 and run.err.startswith("imagen: flux: timed out waiting for prompt %s" % prompt_id)
    assert_timeout_then_cancel(asked, started, 1.5)
    assert fake.deleted == [prompt_id] and fake.interrupts == [prompt_id] and not fake.cleared
    poll(lambda: fake.history.get(prompt_id), message="the interrupted prompt in history")
    assert fake.history[prompt_id]["status"]["status_str"] == "error"


def assert_timeout_then_cancel(asked, started, timeout):
    """The prompt was given `timeout` seconds from the start of the call; the cancel began
    once they were over, and gave itself at most COMFYUI_CANCEL_SECONDS (1 s) in all."""
    submit = next(call for call in asked if (call.method, call.path) == ("POST", "/prompt"))
    assert started + timeout <= submit.deadline <= submit.at + timeout
    after = asked[asked.index(submit) + 1:]
    # the wait's own checks, even one that starts just as the clock jumps past the deadline,
    # are bounded by the prompt's deadline; what comes after with another deadline is the cancel
    waiting = [call for call in after if call.at < submit.deadline or call.deadline == submit.deadline]
    assert {call.deadline for call in waiting} <= {submit.deadline}
    cancel = [call for call in after if call not in waiting]
    assert cancel and {call.deadline for call in cancel} == {cancel[0].deadline}    # one for all
    assert cancel[0].deadline <= cancel[0].at + imagen.COMFYUI_CANCEL_SECONDS == cancel[0].at + 1.0
    assert max(call.timeout for call in cancel) <= 1.0


def test_comfyui_timeout_from_the_backend_block(comfyui, run_main, write_config, fake_clock,
                                                expire_when, asked):
    fake = comfyui(job_seconds=30)
    expire_when(fake, lambda: fake.running, 1.0)
    started = fake_clock.monotonic()
    run, _ = comfy_generate(run_main, comfy_config(write_config, fake.url, timeout=1))
    assert run.code == 1 and "timed out" in run.err
    assert_timeout_then_cancel(asked, started, 1.0)     # the block's 1 s, not the default


def test_comfyui_server_that_stops_answering_times_out(comfyui, run_main, write_config, asked):
    fake = comfyui(hang=True)
    # the wait is in the kernel, on a real socket, for what is left of the timeout: a short one
    run, _ = comfy_generate(run_main, comfy_config(write_config, fake.url), "--timeout", "0.3")
    assert run.code == 1 and run.err == "imagen: flux: %s: timed out\n" % fake.url
    # the socket had the timeout's 0.3 s at most, and no prompt was posted (none to cancel)
    assert [(call.method, call.path) for call in asked] == [("WS", "/ws")]
    assert asked[0].timeout <= 0.3


def test_comfyui_queued_prompt_is_deleted_but_not_interrupted(comfyui, run_main, write_config,
                                                              expire_when):
    fake = comfyui(job_seconds=30, jobs=False)
    other = fake.submit(FakeComfyUI.sample_workflow(), client_id="someone-else")
    poll(lambda: fake.running == other, message="the other prompt running")
    expire_when(fake, lambda: len(fake.pending) == 1, 0.5)
    run, _ = comfy_generate(run_main, comfy_config(write_config, fake.url), "--timeout", "0.5")
    ours = fake.posted_prompts()[0]["prompt_id"]
    assert run.code == 1
    assert fake.deleted == [ours] and fake.interrupts == [] and fake.running == other


def test_comfyui_newer_server_cancels_through_the_jobs_route_only(comfyui, run_main, write_config,
                                                                  expire_when):
    fake = comfyui(job_seconds=30)
    other = fake.submit(FakeComfyUI.sample_workflow(), client_id="someone-else")
    poll(lambda: fake.running == other, message="the other prompt running")
    expire_when(fake, lambda: len(fake.pending) == 1, 0.5)
    run, _ = comfy_generate(run_main, comfy_config(write_config, fake.url), "--timeout", "0.5")
    ours = fake.posted_prompts()[0]["prompt_id"]
    assert run.code == 1 and "timed out waiting for prompt" in run.err
    assert fake.job_cancels == [ours] and fake.deleted == [] and fake.interrupts == []
    assert ours not in fake.pending and fake.running == other


REMOVALS = {    # how someone else takes our pending prompt away: (path, body)
    "queue delete": lambda ours: ("/queue", {"delete": [ours]}),
    "clear queue": lambda ours: ("/queue", {"clear": True}),
    "jobs cancel": lambda ours: ("/api/jobs/%s/cancel" % ours, {}),
    "jobs batch cancel": lambda ours: ("/api/jobs/cancel", {"job_ids": [ours]}),
}


def remove_ours_once_queued(fake, how):
    """As soon as our prompt is queued behind someone else's, remove it as they would (over
    HTTP, before imagen has the answer to its POST /prompt): no timing can miss it."""
    import urllib.request

    def remove(prompt_id):
        if fake.prompts[prompt_id]["client_id"] == "someone-else":
            return
        path, body = REMOVALS[how](prompt_id)
        request = urllib.request.Request(fake.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=10).close()
    fake.on_queue = remove


@pytest.mark.parametrize("how,jobs,websocket", [
    pytest.param(how, jobs, websocket, id="%s, %s server, %s" % (
        how, "newer" if jobs else "older", "websocket" if websocket else "polling"))
    for how, jobs, websocket in [
        ("queue delete", True, True), ("clear queue", True, True), ("jobs cancel", True, True),
        ("jobs batch cancel", True, True), ("queue delete", False, True), ("clear queue", False, True),
        ("jobs cancel", True, False), ("clear queue", False, False)]])
def test_comfyui_prompt_removed_from_the_queue_by_someone_else_fails_at_once(
        comfyui, run_main, write_config, fake_clock, how, jobs, websocket):
    fake = comfyui(job_seconds=30, jobs=jobs, websocket=websocket)
    other = fake.submit(FakeComfyUI.sample_workflow(), client_id="someone-else")
    poll(lambda: fake.running == other, message="the other prompt running")
    remove_ours_once_queued(fake, how)
    run, _ = comfy_generate(run_main, comfy_config(write_config, fake.url), "--timeout", "5")
    ours = fake.posted_prompts()[0]["prompt_id"]
    assert run.code == 1
    assert run.err == ("imagen: flux: prompt %s was removed from the ComfyUI queue on %s before "
                       "it ran\n" % (ours, fake.url))
    assert sum(fake_clock.slept) < 1.0      # on its clock: its first looks, not the 5 s timeout
    # nothing of ours was left to cancel: only the remover's own request is there
    assert len(fake.deleted) == (how == "queue delete") and fake.interrupts == []
    assert len(fake.job_cancels) == how.startswith("jobs") and fake.running == other


def test_comfyui_view_returning_non_image_bytes_is_exit_1(comfyui, run_main, write_config, tmp_path):
    fake = comfyui(view_body=b"<html><body>502 Bad Gateway</body></html>")
    run, _ = comfy_generate(run_main, comfy_config(write_config, fake.url))
    assert run.code == 1
    assert run.err == ("imagen: flux: /view returned something that is not an image "
                       "(text/html, 41 bytes)\n")
    assert listing(tmp_path) == ["imagen.yaml"]


def test_comfyui_output_filename_with_path_parts_is_never_used_locally(comfyui, run_main, write_config,
                                                                      tmp_path, monkeypatch):
    fake = comfyui(filename="../../escaped.png")
    (tmp_path / "deep" / "er").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "deep" / "er")
    run = run_main("--config", comfy_config(write_config, fake.url), "generate", "x", "--json")
    assert run.code == 0, run
    record = json.loads(run.out)
    assert record["backend_meta"]["filename"] == "../../escaped.png"
    assert os.path.basename(record["path"]).startswith("x-") and "escaped" not in record["path"]
    assert not [p for p in tmp_path.rglob("*escaped*")]


def test_comfyui_polls_history_when_the_websocket_cannot_be_opened(comfyui, run_main, write_config):
    fake = comfyui(websocket=False)
    fake.gate = lambda prompt_id: fake.history_empty_answers >= 2    # then it may finish
    run, record = comfy_generate(run_main, comfy_config(write_config, fake.url), "--timeout", "10")
    assert run.code == 0, run
    assert record["backend_meta"]["wait"] == "polling"
    assert fake.history_empty_answers >= 2       # {} while queued or running means "not yet"
    assert fake.posted_prompts()[0]["client_id"]


def test_comfyui_polling_gives_up_at_the_deadline(comfyui, run_main, write_config, fake_clock):
    fake = comfyui(websocket=False, job_seconds=30, jobs=False)
    run, _ = comfy_generate(run_main, comfy_config(write_config, fake.url), "--timeout", "1")
    assert run.code == 1 and "timed out waiting for prompt" in run.err
    # it polled until the deadline and slept past it not at all
    assert fake_clock.slept and sum(fake_clock.slept) <= 1.0
    assert fake.deleted == [fake.posted_prompts()[0]["prompt_id"]]


@pytest.mark.parametrize("jobs", [True, False], ids=["newer server", "older server"])
def test_comfyui_cached_resubmission_returns_the_earlier_image(comfyui, run_main, write_config, tmp_path,
                                                              jobs):
    fake = comfyui(jobs=jobs)
    config = comfy_config(write_config, fake.url)
    _, first = comfy_generate(run_main, config, "--seed", "5")
    run = run_main("--config", config, "generate", "a red fox", "--json", "-o", "again.png", "--seed", "5")
    assert run.code == 0, run
    second = json.loads(run.out)
    assert second["backend_meta"]["filename"] == first["backend_meta"]["filename"]
    assert len(fake.files) == 1                  # no new file was written on the server
    assert (second["width"], second["height"]) == (first["width"], first["height"])


def test_comfyui_reconnects_after_the_socket_drops(comfyui, run_main, write_config):
    fake = comfyui(drop_at_step=2)
    run, record = comfy_generate(run_main, comfy_config(write_config, fake.url))
    assert run.code == 0, run
    client_id = fake.posted_prompts()[0]["client_id"]
    assert fake.ws_connects == [client_id, client_id]    # reconnected with the same id
    assert record["backend_meta"]["wait"] == "websocket"


def test_comfyui_a_lost_end_message_is_caught_by_asking_history(comfyui, run_main, write_config,
                                                                 fake_clock, asked):
    import threading
    fake = comfyui(lose_end=True)
    done = threading.Event()

    def stay_silent():     # once the prompt has ended unannounced: silence, as long as it lasts
        poll(lambda: fake.history and fake.running is None, message="the prompt to end")
        while not done.wait(0.05):
            fake_clock.advance(imagen.COMFYUI_SILENCE_SECONDS)
            fake.wake_clients()
    threading.Thread(target=stay_silent, daemon=True).start()
    started = fake_clock.monotonic()
    try:
        run, record = comfy_generate(run_main, comfy_config(write_config, fake.url))
    finally:
        done.set()
    assert run.code == 0, run
    assert record["backend_meta"]["prompt_id"] in fake.history
    # it asked /history only once the socket had been silent for COMFYUI_SILENCE_SECONDS
    history = [call for call in asked if call.path.startswith("/history/")]
    assert history and history[0].at - started >= imagen.COMFYUI_SILENCE_SECONDS == 5.0


@pytest.mark.parametrize("jobs", [True, False], ids=["newer server", "older server"])
def test_comfyui_prompt_interrupted_by_someone_else_is_exit_1(comfyui, run_main, write_config, jobs):
    import threading
    import urllib.request
    fake = comfyui(job_seconds=30, jobs=jobs)

    def interrupt_when_running():      # once the sampler runs: an earlier interrupt stops node 1
        poll(lambda: fake.running and "3" in fake.last_node.values(), timeout=20,
             message="the sampler running")
        urllib.request.urlopen(urllib.request.Request(fake.url + "/interrupt", data=b"",
                                                      method="POST"), timeout=10).close()
    threading.Thread(target=interrupt_when_running, daemon=True).start()
    run, _ = comfy_generate(run_main, comfy_config(write_config, fake.url))
    assert run.code == 1
    assert run.err == "imagen: flux: the prompt was interrupted on the server at node 3 (KSampler)\n"


def test_comfyui_steps_are_not_recorded_when_the_workflow_takes_none(comfyui, run_main, write_config,
                                                                     tmp_path):
    fake = comfyui()
    config = comfy_config(write_config, fake.url, workflow=user_workflow(tmp_path, TWO_OUTPUTS))
    run, record = comfy_generate(run_main, config)
    assert record["steps"] == 0              # what was asked: the backend default


def test_comfyui_executing_without_prompt_id_does_not_end_the_wait(comfyui):
    adapter = imagen.ComfyUIAdapter("flux", {"url": "http://x"}, {}, imagen.Console(quiet=True))
    workflow = imagen.flux_schnell_workflow("m")
    replay = json.dumps({"type": "executing", "data": {"node": "3", "display_node": "3"}})
    assert adapter._on_event(replay, "http://x", "P", workflow) is False
    null_other = json.dumps({"type": "executing", "data": {"node": None, "prompt_id": "Q"}})
    assert adapter._on_event(null_other, "http://x", "P", workflow) is False
    end = json.dumps({"type": "executing", "data": {"node": None, "prompt_id": "P"}})
    assert adapter._on_event(end, "http://x", "P", workflow) is True


@pytest.mark.parametrize("text", [
    '{"type": "execution_cached", "data": {"nodes": 5, "prompt_id": "P"}}',
    '{"type": "execution_cached", "data": {"nodes": "1234567", "prompt_id": "P"}}',
    '{"type": "progress", "data": {"value": {}, "max": [], "node": ["3"], "prompt_id": "P"}}',
    '{"type": "executing", "data": {"node": {"id": "3"}, "prompt_id": "P"}}',
    '{"type": ["executing"], "data": {"node": null, "prompt_id": "P"}}',
    '{"type": "executing", "data": {"node": null, "prompt_id": ["P"]}}',
    '{"type": "executed", "data": 5}', '[1, 2]', '5', '"text"', "[" * 100000 + "]" * 100000,
], ids=["cached nodes 5", "cached nodes text", "progress objects", "node object", "type list",
        "prompt_id list", "data 5", "array", "number", "string", "deeply nested"])
def test_comfyui_wrong_typed_socket_message_neither_ends_the_wait_nor_crashes(text):
    adapter = imagen.ComfyUIAdapter("flux", {"url": "http://x"}, {}, imagen.Console(stream=TTYBuffer()))
    assert adapter._on_event(text, "http://x", "P", imagen.flux_schnell_workflow("m")) is False


def test_comfyui_wrong_typed_socket_messages_do_not_stop_a_generation(comfyui, write_config, env,
                                                                      tmp_path):
    fake = comfyui(odd_messages=[("execution_cached", {"nodes": 5}), ("execution_cached", {"nodes": "x"}),
                                 ("progress", {"value": {}, "max": [], "node": ["3"]}),
                                 ("executing", {"node": {"id": 3}}), ("executed", 5), ("status", [])])
    stream = TTYBuffer()
    config = imagen.load_config(str(comfy_config(write_config, fake.url)), env)
    records = imagen.generate("a fox", config=config, env=env, console=imagen.Console(stream=stream),
                              output=str(tmp_path / "a.png"))
    assert records[0]["backend_meta"]["wait"] == "websocket" and (tmp_path / "a.png").exists()
    assert "cached on the server" not in stream.text


def test_comfyui_fake_sends_no_execution_messages_without_client_id(comfyui):
    fake = comfyui()
    prompt_id = fake.submit(FakeComfyUI.sample_workflow(), client_id=None)
    poll(lambda: fake.history.get(prompt_id), message="the anonymous prompt to finish")
    socket = imagen.WebSocket.connect("ws://127.0.0.1:%d/ws?clientId=watcher" % fake.port)
    kinds = []
    while True:
        message = socket.recv(timeout=0.05)      # all it had to say was sent by then
        if message is None:
            break
        kinds.append(json.loads(message[1])["type"])
    socket.close()
    assert kinds == ["status"]


def generate_behind_another_prompt(fake, write_config, env, tmp_path, ours_until=None):
    """Generate on a terminal while someone else's prompt runs: (record, stderr text). The
    other prompt runs until imagen has shown ours queued behind it; ours, once imagen has
    shown `ours_until` (when given), or after 10 s, so that a bug fails the test instead
    of hanging it."""
    import time
    stream, give_up = TTYBuffer(), time.monotonic() + 10

    def released(prompt_id):
        if time.monotonic() > give_up:
            return True
        if fake.prompts[prompt_id]["client_id"] == "someone-else":
            return "flux: queued, 1 ahead" in stream.text
        return ours_until is None or ours_until in stream.text
    fake.gate = released
    other = fake.submit(FakeComfyUI.sample_workflow(), client_id="someone-else")
    poll(lambda: fake.running == other, message="the other prompt running")
    config = imagen.load_config(str(comfy_config(write_config, fake.url)), env)
    records = imagen.generate("a fox", config=config, env=env, console=imagen.Console(stream=stream),
                              output=str(tmp_path / "a.png"))
    return records[0], stream.text


def test_comfyui_progress_shows_queue_position_nodes_and_steps(comfyui, write_config, env, tmp_path):
    record, shown = generate_behind_another_prompt(comfyui(), write_config, env, tmp_path)
    assert record["backend_meta"]["wait"] == "websocket"
    assert "flux: queued, 1 ahead" in shown
    assert "flux: KSampler (node 3) step 4/4" in shown and "flux: SaveImage (node 9)" in shown
    assert shown.endswith("\r\x1b[2K")          # the status line is cleared at the end


def test_comfyui_progress_while_polling_shows_queue_then_running(comfyui, write_config, env, tmp_path):
    fake = comfyui(websocket=False)
    record, shown = generate_behind_another_prompt(fake, write_config, env, tmp_path,
                                                   ours_until="flux: running")
    assert record["backend_meta"]["wait"] == "polling"
    assert shown.index("flux: queued, 1 ahead") < shown.index("flux: running")


def test_comfyui_progress_reaches_an_on_progress_listener_with_its_steps(
        comfyui, write_config, env, tmp_path):
    import time
    fake, heard, give_up = comfyui(), [], time.monotonic() + 10
    # the other prompt runs until the listener has heard ours queued behind it (or 10 s)
    fake.gate = lambda prompt_id: fake.prompts[prompt_id]["client_id"] != "someone-else" \
        or ("flux: queued, 1 ahead", None, None) in heard or time.monotonic() > give_up
    other = fake.submit(FakeComfyUI.sample_workflow(), client_id="someone-else")
    poll(lambda: fake.running == other, message="the other prompt running")
    console = imagen.Console(quiet=True, on_progress=lambda *report: heard.append(report))
    imagen.generate("a fox", config=imagen.load_config(str(comfy_config(write_config, fake.url)), env),
                    env=env, console=console, output=str(tmp_path / "a.png"))
    assert ("flux: queued, 1 ahead", None, None) in heard      # someone listens: worth a GET
    assert ("flux: KSampler (node 3) step 4/4", 4, 4) in heard
    assert ("flux: SaveImage (node 9)", None, None) in heard


def test_comfyui_quiet_or_no_terminal_means_no_progress(comfyui, run_main, write_config):
    fake = comfyui(job_seconds=0.05)
    run, _ = comfy_generate(run_main, comfy_config(write_config, fake.url))
    assert run.err == "" and not any(r.path == "/queue" for r in fake.requests)


def test_comfyui_several_hosts_pick_the_shortest_queue_and_skip_refusing_ones(comfyui, run_main,
                                                                              write_config):
    busy, idle, down = comfyui(load=3), comfyui(load=1), refused_url()
    run, record = comfy_generate(run_main, comfy_config(write_config, [down, busy.url, idle.url]))
    assert run.code == 0, run
    assert record["backend_meta"]["host"] == idle.url
    assert [r.path for r in busy.requests] == ["/prompt"] and busy.requests[0].method == "GET"
    assert len(idle.posted_prompts()) == 1


def test_comfyui_several_hosts_ties_go_to_the_first_listed(comfyui, run_main, write_config):
    first, second = comfyui(), comfyui()
    run, record = comfy_generate(run_main, comfy_config(write_config, [first.url, second.url]))
    assert record["backend_meta"]["host"] == first.url and second.posted_prompts() == []


def test_comfyui_no_healthy_host_lists_every_one(comfyui, run_main, write_config):
    down = refused_url()
    stranger = comfyui()
    stranger.route = lambda request: (404, {}, "404: Not Found")
    run, _ = comfy_generate(run_main, comfy_config(write_config, [down, stranger.url]))
    assert run.code == 1
    assert run.err == ("imagen: flux: no healthy ComfyUI host: %s: connection refused; %s: not a "
                       "ComfyUI server (GET /prompt: HTTP 404)\n" % (down, stranger.url))


def test_comfyui_that_drips_its_answers_cannot_outlast_the_timeout(drip_server, run_main,
                                                                 write_config, fake_clock):
    server = drip_server()
    run, _ = comfy_generate(run_main, comfy_config(write_config, server.url), "--timeout", "1")
    assert run.code == 1 and "timed out" in run.err, run
    assert server.connections >= 1 and server.outlasted == 0    # imagen hung up, every time


def test_comfyui_is_reached_through_the_proxy_in_http_proxy(comfyui, run_main, write_config,
                                                            forward_proxy, monkeypatch):
    fake = comfyui()
    monkeypatch.setenv("HTTP_PROXY", forward_proxy.url)
    host = "http://gpu.invalid:%d" % fake.port
    run, record = comfy_generate(run_main, comfy_config(write_config, host))
    assert run.code == 0, run
    assert record["backend_meta"]["wait"] == "websocket"      # the socket went through too
    assert forward_proxy.seen[0] == "CONNECT gpu.invalid:%d" % fake.port
    assert "POST %s/prompt" % host in forward_proxy.seen
    assert any(line.startswith("GET %s/view?" % host) for line in forward_proxy.seen)


def test_comfyui_every_route_also_answers_under_api(comfyui):
    import urllib.request
    fake = comfyui()
    for path in ("/prompt", "/api/prompt", "/queue", "/api/queue", "/api/system_stats"):
        with urllib.request.urlopen(fake.url + path, timeout=10) as response:
            assert response.status == 200 and json.loads(response.read())


def test_comfyui_history_is_empty_while_queued_or_running(comfyui):
    import urllib.request
    fake = comfyui(job_seconds=30)
    prompt_id = fake.submit(FakeComfyUI.sample_workflow(), client_id="c")
    with urllib.request.urlopen(fake.url + "/history/" + prompt_id, timeout=10) as response:
        assert json.loads(response.read()) == {}


def comfy_call(fake, method, path, body=None):
    """(status, decoded JSON or text) of one request to a fake ComfyUI."""
    import urllib.error
    import urllib.request
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(fake.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, raw, kind = response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        status, raw, kind = exc.code, exc.read(), exc.headers["Content-Type"]
    return status, json.loads(raw) if "json" in (kind or "") else raw.decode()


def test_fake_comfyui_has_the_jobs_routes_of_comfyui_0_33(comfyui):
    fake = comfyui(job_seconds=30)
    running = fake.submit(FakeComfyUI.sample_workflow(), client_id="a")
    poll(lambda: fake.running == running, message="the first prompt running")
    pending = fake.submit(FakeComfyUI.sample_workflow(), client_id="b")
    status, page = comfy_call(fake, "GET", "/api/jobs")
    assert status == 200 and page["pagination"] == {"offset": 0, "limit": None, "total": 2,
                                                    "has_more": False}
    assert {j["id"]: j["status"] for j in page["jobs"]} == {running: "in_progress", pending: "pending"}
    assert [j["id"] for j in comfy_call(fake, "GET", "/api/jobs?status=pending")[1]["jobs"]] == [pending]
    assert comfy_call(fake, "GET", "/api/jobs?status=bogus")[0] == 400
    assert comfy_call(fake, "GET", "/api/jobs/" + pending)[1]["status"] == "pending"
    assert comfy_call(fake, "POST", "/api/jobs/%s/cancel" % pending) == (200, {"cancelled": True})
    assert comfy_call(fake, "GET", "/api/jobs/" + pending) == (404, {"error": "Job not found"})
    assert comfy_call(fake, "POST", "/api/jobs/%s/cancel" % pending) == (200, {"cancelled": False})
    assert comfy_call(fake, "POST", "/api/jobs/not-a-uuid/cancel")[0] == 400
    assert comfy_call(fake, "POST", "/api/jobs/cancel", {"job_ids": [running]}) == (200, {"cancelled": True})
    poll(lambda: running in fake.history, message="the interrupted prompt in history")
    job = comfy_call(fake, "GET", "/api/jobs/" + running)[1]
    assert job["status"] == "cancelled" and job["outputs"] == {} and "execution_end_time" in job
    assert fake.job_cancels == [pending, pending, running] and fake.deleted == []


def test_fake_comfyui_as_an_older_server_answers_404_on_the_jobs_routes(comfyui):
    fake = comfyui(jobs=False)
    prompt_id = fake.submit(FakeComfyUI.sample_workflow(), client_id="c")
    for method, path in [("GET", "/api/jobs"), ("GET", "/api/jobs/" + prompt_id),
                         ("POST", "/api/jobs/%s/cancel" % prompt_id), ("POST", "/api/jobs/cancel")]:
        assert comfy_call(fake, method, path, {} if method == "POST" else None) == (404, "404: Not Found")


def raw_call(url, method, path, body=b"", headers=None):
    """(status, headers, body bytes) of one request made with http.client."""
    import http.client
    from urllib.parse import urlsplit
    conn = http.client.HTTPConnection(urlsplit(url).netloc, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def comfy_upload(fake, data, filename="in.png", prefix="", **fields):
    form = [("image", (filename, data, "image/png"))] + [(k, v) for k, v in fields.items()]
    kind, body = encode_multipart(form)
    status, _, raw = raw_call(fake.url, "POST", prefix + "/upload/image", body, {"Content-Type": kind})
    return status, json.loads(raw) if status == 200 else raw


def load_image_workflow(name):
    return {"1": {"class_type": "LoadImage", "inputs": {"image": name, "upload": "image"}},
            "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "edit", "images": ["1", 0]}}}


def test_fake_comfyui_uploads_images_as_comfyui_0_33_names_them(comfyui):
    import hashlib
    fake = comfyui()
    red, blue = solid_png(3, 2), solid_png(5, 4)
    assert comfy_upload(fake, red) == (200, {"name": "in.png", "subfolder": "", "type": "input"})
    # the same bytes again: recognised, the name kept, nothing stored twice
    assert comfy_upload(fake, red, prefix="/api", type="input")[1]["name"] == "in.png"
    # other bytes under the same name: renamed, unless overwrite is asked for
    assert comfy_upload(fake, blue)[1]["name"] == "in (1).png"
    assert comfy_upload(fake, blue)[1]["name"] == "in (1).png"
    assert comfy_upload(fake, blue, overwrite="true")[1]["name"] == "in.png"
    assert comfy_upload(fake, red, subfolder="edits", type="temp") == (
        200, {"name": "in.png", "subfolder": "edits", "type": "temp"})
    assert [u["outcome"] for u in fake.uploads] == ["new", "duplicate", "new", "duplicate",
                                                     "overwritten", "new"]
    assert fake.uploads[0]["sha256"] == hashlib.sha256(red).hexdigest()
    assert fake.files[("in.png", "", "input")] == blue and fake.files[("in (1).png", "", "input")] == blue
    status, headers, body = raw_call(fake.url, "GET", "/view?filename=in.png&subfolder=edits&type=temp")
    assert status == 200 and body == red
    assert comfy_upload(fake, red, subfolder="../models")[0] == 400     # outside input/
    assert comfy_upload(fake, red, type="models")[0] == 500
    kind, body = encode_multipart([("type", "input")])
    assert raw_call(fake.url, "POST", "/upload/image", body, {"Content-Type": kind})[0] == 400
    assert len(fake.uploads) == 6


def test_fake_comfyui_load_image_validates_only_uploaded_files(comfyui):
    fake = comfyui()
    status, body = comfy_call(fake, "POST", "/prompt", {"prompt": load_image_workflow("nope.png"),
                                                        "client_id": "c"})
    assert status == 400 and body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["node_errors"]["1"]["errors"] == [{
        "type": "custom_validation_failed", "message": "Custom validation failed for node",
        "details": "image - Invalid image file: nope.png", "extra_info": {"input_name": "image"}}]
    assert body["node_errors"]["1"]["class_type"] == "LoadImage"
    comfy_upload(fake, solid_png(24, 16), filename="fox.png", subfolder="imagen")
    status, body = comfy_call(fake, "POST", "/prompt", {"prompt": load_image_workflow("imagen/fox.png"),
                                                        "client_id": "c"})
    assert status == 200
    poll(lambda: body["prompt_id"] in fake.history, message="the LoadImage prompt done")
    image = fake.history[body["prompt_id"]]["outputs"]["2"]["images"][0]
    assert png_size(fake.files[(image["filename"], "", "output")]) == (24, 16)   # the input's size


def interrupt(proc):
    """Ctrl-C to a running imagen: its stderr, once it has exited 130."""
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 130
    return proc.stderr.read().decode()


@pytest.mark.parametrize("jobs", [True, False], ids=["newer server", "older server"])
def test_sigint_cancels_our_prompt_only_and_exits_130(comfyui, env, write_config, tmp_path, jobs):
    fake = comfyui(job_seconds=60, jobs=jobs)
    config = comfy_config(write_config, fake.url)
    proc = popen_imagen(["--config", config, "generate", "x", "-o", tmp_path / "a.png"],
                        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ours = poll(lambda: fake.running, timeout=20, message="our prompt running")
        other = fake.submit(FakeComfyUI.sample_workflow(), client_id="someone-else")
        err = interrupt(proc)
    finally:
        proc.kill()
        proc.wait()
    assert fake.prompts[ours]["client_id"] == fake.posted_prompts()[0]["client_id"]
    if jobs:     # one race-free request: POST /api/jobs/{id}/cancel
        assert fake.job_cancels == [ours] and fake.deleted == [] and fake.interrupts == []
    else:
        assert fake.deleted == [ours] and fake.interrupts == [ours] and not fake.cleared
    assert "imagen: interrupted" in err and "Traceback" not in err
    poll(lambda: fake.running == other or other in fake.history, message="the other prompt to go on")
    assert not (tmp_path / "a.png").exists()


def test_backends_lists_comfyui_as_usable_with_its_urls(run_main, write_config):
    config = comfy_config(write_config, ["http://gpu-host:8188", "http://gpu-2:8188"])
    data = json.loads(run_main("--config", config, "backends", "--json").out)
    row = {b["name"]: b for b in data["backends"]}["flux"]
    assert row["usable"] and row["note"] == "http://gpu-host:8188, http://gpu-2:8188"
    assert "comfyui" in data["adapters"] and row["model"] == "flux1-schnell-fp8.safetensors"


def test_backends_calls_comfyui_configured_until_check_probes_each_host(
        run_main, write_config, comfyui, fake_clock, asked):
    # the hung host stays silent past any deadline on the test's clock (a Stall), and the
    # test asserts below that each probe was given exactly BACKEND_CHECK_SECONDS
    up, hung, down = comfyui(), comfyui(hang=True), refused_url()
    stranger = comfyui()
    stranger.route = lambda request: (404, {}, "404: Not Found")
    config = write_config("default_backend: up\nbackends:\n"
                          "  up:\n    adapter: comfyui\n    url: %s\n"
                          "  some:\n    adapter: comfyui\n    url: [%s, %s]\n"
                          "  none:\n    adapter: comfyui\n    url: [%s, %s, %s]\n"
                          % (up.url, up.url, down, down, hung.url, stranger.url))
    run = run_main("--config", config, "backends")
    rows = {line[2:].split()[0]: line for line in run.lines[2:]}
    assert run.code == 0 and "usable" in rows["mock"]
    assert "configured: %s" % up.url in rows["up"] and "usable" not in rows["up"]
    run = run_main("--config", config, "backends", "--check")
    assert run.code == 1, run                 # a backend none of whose hosts answers
    rows = {line[2:].split()[0]: line for line in run.lines[2:]}
    assert "reachable: %s (ComfyUI 0.33.0)" % up.url in rows["up"]
    assert "partly reachable: %s (ComfyUI 0.33.0); %s: connection refused" % (up.url, down) \
        in rows["some"]
    assert ("unreachable: %s: connection refused; %s: timed out; %s: not a ComfyUI server "
            "(GET /system_stats: HTTP 404)" % (down, hung.url, stranger.url)) in rows["none"]
    data = json.loads(run_main("--config", config, "backends", "--check", "--json").out)
    row = {b["name"]: b for b in data["backends"]}["some"]
    assert row["status"] == "partly reachable" and row["usable"] is True
    assert [(h["url"], h["reachable"]) for h in row["hosts"]] == [(up.url, True), (down, False)]
    probes = [call for call in asked if call.path == "/system_stats"]
    seconds = imagen.BACKEND_CHECK_SECONDS
    assert len(probes) == 2 * 6 and {call.timeout for call in probes} == {seconds}
    assert all(call.deadline <= call.at + seconds for call in probes)
    assert run_main("--config", config, "backends", "--json").code == 0


@pytest.mark.parametrize("block,message", [
    ("    url: gpu-host:8188\n", "backends.flux.url: must be an http:// or https:// URL"),
    ("    url: []\n", "backends.flux.url: must be a string or a non-empty list"),
    ("", "backends.flux.url: missing (the comfyui adapter needs it)"),
    ("    url: http://h\n    output_node: [1]\n", "backends.flux.output_node: must be a node id"),
])
def test_comfyui_config_errors_name_the_yaml_path(run_main, write_config, block, message):
    config = write_config("backends:\n  flux:\n    adapter: comfyui\n" + block)
    run = run_main("--config", config, "config", "validate")
    assert run.code == 2 and message in run.err


# ----- the WebSocket client, against hand-made servers -----

def ws_server(script):
    """A one-connection raw TCP server on 127.0.0.1 running script(connection, request
    head); returns (url, thread)."""
    import socket
    import threading
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve():
        connection, _ = listener.accept()
        head = b""
        while b"\r\n\r\n" not in head:
            head += connection.recv(4096)
        try:
            script(connection, head.decode("latin-1"))
        finally:
            connection.close()
            listener.close()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return "ws://127.0.0.1:%d/ws" % listener.getsockname()[1], thread


def upgrade(connection, head, accept=None):
    key = [l.split(":", 1)[1].strip() for l in head.split("\r\n") if l.lower().startswith("sec-websocket-key")][0]
    connection.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                        "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n"
                        % (accept or ws_accept_for(key))).encode())


def test_websocket_client_reassembles_fragments_and_answers_pings():
    got = {}

    def script(connection, head):
        upgrade(connection, head)
        big = b"x" * 70000
        connection.sendall(ws_frame(0x1, b'{"a": ', fin=False) + ws_frame(0x9, b"hi")
                           + ws_frame(0x0, b'"b"}') + ws_frame(0x2, big))
        reader = connection.makefile("rb")
        got["pong"] = ws_read_frame(reader)
        got["ping"] = ws_read_frame(reader)
        connection.sendall(ws_frame(0xA, got["ping"][2]) + ws_frame(0x1, b"after the pong"))
        got["echo"] = ws_read_frame(reader)
        got["close"] = ws_read_frame(reader)
    url, thread = ws_server(script)
    socket = imagen.WebSocket.connect(url)
    assert socket.recv(timeout=5) == (imagen.WS_TEXT, '{"a": "b"}')
    assert socket.recv(timeout=5) == (imagen.WS_BINARY, b"x" * 70000)
    socket.ping(b"still there?")
    assert socket.recv(timeout=5) == (imagen.WS_TEXT, "after the pong")    # the pong is taken
    socket.send("é" * 200)
    socket.close()
    thread.join(5)
    assert got["pong"] == (1, 0xA, b"hi", 1)
    assert got["ping"] == (1, 0x9, b"still there?", 1)
    assert got["echo"] == (1, 0x1, ("é" * 200).encode(), 1)     # masked, unmasked by the reader
    assert got["close"][1] == 0x8 and got["close"][3] == 1


def test_websocket_client_times_out_without_losing_a_half_sent_frame():
    import threading
    release = threading.Event()

    def script(connection, head):
        upgrade(connection, head)
        frame = ws_frame(0x1, b"hello world")
        connection.sendall(frame[:5])
        release.wait(10)
        connection.sendall(frame[5:])
        release.wait(0.5)
    url, thread = ws_server(script)
    socket = imagen.WebSocket.connect(url)
    assert socket.recv(timeout=0.05) is None         # what is there is half a frame
    release.set()
    assert socket.recv(timeout=5) == (imagen.WS_TEXT, "hello world")
    socket.close()


def test_websocket_client_reports_a_close_frame():
    def script(connection, head):
        upgrade(connection, head)
        connection.sendall(ws_frame(0x8, struct.pack(">H", 1001) + b"going away"))
        ws_read_frame(connection.makefile("rb"))
    url, thread = ws_server(script)
    socket = imagen.WebSocket.connect(url)
    with pytest.raises(imagen.WebSocketClosed) as error:
        socket.recv(timeout=5)
    assert error.value.status == 1001 and "going away" in error.value.message


@pytest.mark.parametrize("script,message", [
    (lambda c, h: upgrade(c, h, accept="d3Jvbmc="), "wrong Sec-WebSocket-Accept"),
    (lambda c, h: c.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"),
     "HTTP 404 instead of a WebSocket upgrade"),
])
def test_websocket_client_refuses_a_bad_handshake(script, message):
    url, thread = ws_server(script)
    with pytest.raises(imagen.WebSocketError) as error:
        imagen.WebSocket.connect(url)
    assert message in error.value.message


def test_websocket_client_rejects_a_masked_server_frame():
    def script(connection, head):
        upgrade(connection, head)
        connection.sendall(b"\x81\x82abcd" + bytes(x ^ y for x, y in zip(b"hi", b"ab")))
    url, thread = ws_server(script)
    socket = imagen.WebSocket.connect(url)
    with pytest.raises(imagen.WebSocketError) as error:
        socket.recv(timeout=5)
    assert "the server masked a frame" in error.value.message


@pytest.mark.parametrize("size,fits", [(3000, True), (5000, False)])
def test_http_body_without_a_length_is_capped_too(size, fits):
    def script(connection, head):      # chunked: no Content-Length to check up front
        body = b"x" * size
        connection.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                           + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    url, thread = ws_server(script)
    client = imagen.HttpClient(max_body=4096)
    try:
        if fits:
            assert client.request("GET", "http" + url[2:]).body == b"x" * size
        else:
            with pytest.raises(imagen.ImagenError) as error:
                client.request("GET", "http" + url[2:])
            assert "larger than 4096 bytes" in error.value.message
    finally:
        client.close()


def test_websocket_mask_is_its_own_inverse():
    payload = bytes(range(256)) * 3 + b"tail"
    masked = imagen.ws_mask(payload, b"\x01\x02\x03\x04")
    assert masked != payload and imagen.ws_mask(masked, b"\x01\x02\x03\x04") == payload
    assert masked[:4] == bytes((0 ^ 1, 1 ^ 2, 2 ^ 3, 3 ^ 4))


# ----- the HTTP client: whole-request deadlines, proxies, keep-alive -----

def dripped_out(server, function, *args, **kwargs):
    """The ImagenError function raised against a DripServer on fake_clock, having checked
    that it hung up, not the server at its limit (20 s of drips: a client that reads each
    drip with a fresh timeout never ends by itself)."""
    with pytest.raises(imagen.ImagenError) as error:
        function(*args, **kwargs)
    assert server.connections >= 1 and server.outlasted == 0
    return error.value


def test_an_answer_of_deeply_nested_json_reads_as_no_json():
    # json.loads raises RecursionError, not ValueError, on "[[[[..."; every adapter reads
    # answers through HttpResponse.json(), which must say "not JSON" instead of crashing
    deep = imagen.HttpResponse(200, {}, b"[" * 100000 + b"]" * 100000, "http://127.0.0.1/")
    assert deep.json() is None


def test_http_request_ends_by_its_deadline_while_the_headers_drip(drip_server, fake_clock):
    server = drip_server()
    client = imagen.HttpClient(timeout=30)
    error = dripped_out(server, client.request, "GET", server.url + "/history",
                        retry=imagen.NO_RETRY, deadline=fake_clock.monotonic() + 0.3)
    client.close()
    assert "timed out" in error.message


def test_http_request_without_a_deadline_ends_by_the_client_timeout_while_the_body_drips(
        drip_server, fake_clock):
    server = drip_server(head=b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", fill=b"x")
    client = imagen.HttpClient(timeout=0.3)
    error = dripped_out(server, client.request, "POST", server.url + "/prompt", body=b"{}",
                        retry=imagen.NO_RETRY)
    client.close()
    assert "timed out" in error.message


def test_websocket_handshake_ends_by_its_timeout_while_the_answer_drips(drip_server, fake_clock):
    server = drip_server(head=b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nX-Slow: ")
    error = dripped_out(server, imagen.WebSocket.connect, "ws" + server.url[4:] + "/ws", timeout=0.3)
    assert isinstance(error, imagen.WebSocketError)
    assert "timed out" in error.message


def proxied(fake, host="imagen-test.invalid"):
    """A URL of a loopback fake under a host name only the ForwardProxy can reach."""
    return "http://%s:%d" % (host, fake.port)


def test_plain_http_goes_to_the_proxy_as_an_absolute_uri_with_its_credentials(http_fake,
                                                                            forward_proxy):
    import base64
    fake = http_fake(lambda request: (200, {}, "through"))
    proxy_url = forward_proxy.url.replace("http://", "http://me:p%40ss@")
    client = imagen.HttpClient(env={"http_proxy": proxy_url})
    assert client.request("GET", proxied(fake) + "/x?y=1").body == b"through"
    assert client.request("POST", proxied(fake) + "/z", body=b"{}").body == b"through"
    client.close()
    assert forward_proxy.seen == ["GET %s/x?y=1" % proxied(fake), "POST %s/z" % proxied(fake)]
    assert forward_proxy.headers[0]["proxy-authorization"] == "Basic " + base64.b64encode(
        b"me:p@ss").decode()
    assert [r.raw_path for r in fake.requests] == ["/x?y=1", "/z"]
    assert "proxy-authorization" not in fake.requests[0].headers


def test_a_tunnelled_scheme_goes_through_one_connect_per_connection(http_fake, forward_proxy,
                                                                    monkeypatch):
    # https is what gets tunnelled; plain http stands in for it here, so no TLS is needed
    monkeypatch.setattr(imagen.HttpClient, "TUNNELLED", frozenset(("http", "https")))
    fake = http_fake(lambda request: (200, {}, "tunnelled"))
    client = imagen.HttpClient(env={"HTTP_PROXY": forward_proxy.url})
    assert client.request("GET", proxied(fake) + "/a").body == b"tunnelled"
    assert client.request("GET", proxied(fake) + "/b").body == b"tunnelled"
    client.close()
    assert forward_proxy.seen == ["CONNECT imagen-test.invalid:%d" % fake.port]
    assert [r.raw_path for r in fake.requests] == ["/a", "/b"]
    assert fake.requests[0].headers["host"] == "imagen-test.invalid:%d" % fake.port


def test_https_through_the_proxy_is_a_connect_tunnel_with_tls_to_the_host(
        http_fake, forward_proxy, tls_cert, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", tls_cert[0])
    fake = http_fake(lambda request: (201, {}, "made"), tls=tls_cert)
    client = imagen.HttpClient(env={"HTTPS_PROXY": forward_proxy.url})
    url = "https://tls-test.invalid:%d/v1/predictions" % fake.port
    for _ in range(2):
        assert client.request("POST", url, body=b"{}", headers={"Authorization": "Bearer t0k"},
                              retry=imagen.NO_RETRY).body == b"made"
    client.close()
    assert forward_proxy.seen == ["CONNECT tls-test.invalid:%d" % fake.port]
    assert "authorization" not in forward_proxy.headers[0]       # only the host sees it
    assert [r.headers["authorization"] for r in fake.requests] == ["Bearer t0k"] * 2


def test_a_certificate_that_does_not_verify_is_reported_as_such(http_fake, tls_cert,
                                                                monkeypatch):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    fake = http_fake(lambda request: (200, {}, "ok"), tls=tls_cert)
    client = imagen.HttpClient()
    with pytest.raises(imagen.ImagenError) as error:
        client.request("GET", fake.url + "/", retry=imagen.NO_RETRY)
    assert "certificate verify failed" in error.value.message and fake.requests == []


def test_an_unreachable_proxy_is_named_in_the_error_without_its_password():
    address = refused_url()[len("http://"):]
    client = imagen.HttpClient(env={"HTTPS_PROXY": "http://me:s3cret-pw@" + address})
    with pytest.raises(imagen.ImagenError) as error:
        client.request("GET", "https://api.example.com/v1/models", retry=imagen.NO_RETRY)
    assert error.value.message == ("https://api.example.com/v1/models: connection refused "
                                   "(through the proxy http://%s)" % address)


def test_loopback_hosts_bypass_the_proxy(http_fake, forward_proxy):
    fake = http_fake(lambda request: (200, {}, "direct"))
    client = imagen.HttpClient(env={"HTTP_PROXY": forward_proxy.url})
    assert client.request("GET", fake.url + "/a").body == b"direct"
    assert client.request("GET", proxied(fake, "localhost") + "/b").body == b"direct"
    client.close()
    assert forward_proxy.seen == [] and len(fake.requests) == 2


@pytest.mark.parametrize("url,env,proxy", [
    ("https://api.example.com/v1", {"HTTPS_PROXY": "http://p:3128"}, "p:3128"),
    ("https://api.example.com/v1", {"HTTP_PROXY": "http://p:3128"}, None),
    ("http://api.example.com/v1", {"HTTP_PROXY": "p:3128"}, "p:3128"),
    ("ws://gpu.lan:8188/ws", {"HTTP_PROXY": "http://p:3128"}, "p:3128"),
    ("wss://gpu.lan/ws", {"https_proxy": "http://p"}, "p:80"),
    ("http://h.example/", {"HTTP_PROXY": "http://upper:1", "http_proxy": "http://lower:2"},
     "lower:2"),
    ("http://h.example/", {"HTTP_PROXY": "http://upper:1", "http_proxy": ""}, None),
    ("http://127.0.0.1:8188/", {"HTTP_PROXY": "http://p:1"}, None),
    ("http://[::1]:8188/", {"HTTP_PROXY": "http://p:1"}, None),
    ("http://LocalHost/", {"HTTP_PROXY": "http://p:1"}, None),
    ("http://h.example/", {"HTTP_PROXY": "http://p:1", "NO_PROXY": "*"}, None),
    ("http://a.h.example/", {"HTTP_PROXY": "http://p:1", "no_proxy": "x.org, .h.example"}, None),
    ("http://h.example/", {"HTTP_PROXY": "http://p:1", "NO_PROXY": "H.example"}, None),
    ("http://noth.example/", {"HTTP_PROXY": "http://p:1", "NO_PROXY": "h.example"}, "p:1"),
    ("http://h.example:8080/", {"HTTP_PROXY": "http://p:1", "NO_PROXY": "h.example:8080"}, None),
    ("http://h.example:9090/", {"HTTP_PROXY": "http://p:1", "NO_PROXY": "h.example:8080"},
     "p:1"),
])
def test_proxy_comes_from_the_environment_like_urllib_and_curl(url, env, proxy):
    found = imagen.proxy_for(url, env)
    assert (found and "%s:%d" % (found.host, found.port)) == proxy


@pytest.mark.parametrize("value", ["socks5://p:1080", "https://p:3128", "http://p:99999"])
def test_a_proxy_imagen_cannot_use_is_exit_2_naming_the_variable(value):
    with pytest.raises(imagen.ImagenError) as error:
        imagen.proxy_for("https://api.example.com/", {"HTTPS_PROXY": value})
    assert error.value.code == 2 and "HTTPS_PROXY" in error.value.message


def keep_alive_server(on_post):
    """A raw HTTP/1.1 server on 127.0.0.1 answering each GET (keep-alive) and handing each
    POST, once its body is read, to on_post(connection); returns (url, posts)."""
    import socket
    import threading
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    posts = []

    def serve(connection):
        reader = connection.makefile("rb")
        try:
            while True:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = reader.readline()
                    if not line:
                        return
                    head += line
                if head.startswith(b"POST"):
                    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                    posts.append(reader.read(length))
                    if not on_post(connection):
                        return
                else:
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        finally:
            reader.close()
            connection.close()

    def accept():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(connection,), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()
    return "http://127.0.0.1:%d" % listener.getsockname()[1], posts, listener


def test_a_post_dropped_unanswered_on_a_kept_alive_connection_is_never_sent_again():
    url, posts, listener = keep_alive_server(on_post=lambda connection: False)
    client = imagen.HttpClient(timeout=5)
    try:
        assert client.request("GET", url + "/ping").body == b"ok"
        with pytest.raises(imagen.ImagenError) as error:
            client.request("POST", url + "/predictions", body=b'{"n": 1}',
                           retry=imagen.RetryPolicy(transport="connect"))
    finally:
        client.close()
        listener.close()
    assert posts == [b'{"n": 1}'] and url[7:] in error.value.message


def test_a_get_dropped_unanswered_on_a_kept_alive_connection_is_sent_again_once():
    import socket
    import threading
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    heads = []

    def serve():
        first, _ = listener.accept()
        first.recv(4096)
        first.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        heads.append(first.recv(4096))          # the second GET: read, then dropped
        first.close()
        second, _ = listener.accept()
        heads.append(second.recv(4096))
        second.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nagain")
        second.close()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = imagen.HttpClient(timeout=5)
    url = "http://127.0.0.1:%d" % listener.getsockname()[1]
    try:
        assert client.request("GET", url + "/a").body == b"ok"
        assert client.request("GET", url + "/b", retry=imagen.NO_RETRY).body == b"again"
    finally:
        client.close()
        listener.close()
    assert [h.split(b" ")[1] for h in heads] == [b"/b", b"/b"]


def test_a_post_after_the_server_closed_the_idle_connection_goes_on_a_new_one():
    import socket
    import threading
    closed = threading.Event()

    def answer_then_hang_up(connection):
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        # close() alone leaves the socket open while the server's reader holds it: the
        # FIN went out only later, and the test raced it; shutdown sends it now
        connection.shutdown(socket.SHUT_RDWR)
        connection.close()
        closed.set()
    url, posts, listener = keep_alive_server(on_post=answer_then_hang_up)
    client = imagen.HttpClient(timeout=5)
    try:
        client.request("POST", url + "/a", body=b"1", retry=imagen.NO_RETRY)
        assert closed.wait(5)
        assert client.request("POST", url + "/b", body=b"2", retry=imagen.NO_RETRY).body == b"ok"
    finally:
        client.close()
        listener.close()
    assert posts == [b"1", b"2"]


def test_a_retry_the_deadline_overtakes_in_its_sleep_reports_the_refusal(monkeypatch):
    # a loaded machine sleeps longer than asked: the retry after a refused connection
    # then starts past the deadline, and what failed is still the refusal
    class Oversleeping(FakeClock):
        def sleep(self, seconds):
            super().sleep(seconds * 10)
    monkeypatch.setattr(imagen, "clock", Oversleeping())
    client = imagen.HttpClient()
    with pytest.raises(imagen.ImagenError) as caught:
        client.request("GET", refused_url() + "/x", deadline=imagen.clock.monotonic() + 1.0,
                       context="probe")
    assert caught.value.message == "probe: connection refused"


@pytest.mark.parametrize("value", ["-5", "-0.5", "nan", "inf"])
def test_a_negative_or_endless_retry_after_is_ignored(value):
    response = imagen.HttpResponse(429, {"retry-after": value}, b"", "http://h/")
    assert imagen.retry_after_seconds(response) is None


# ----- image input: uploads, placeholders, the img2img workflow -----

def test_comfyui_uploads_each_input_once_per_host_into_the_img2img_workflow(
        run_main, write_config, comfyui, tmp_path):
    busy, idle = comfyui(load=5), comfyui()
    config = comfy_config(write_config, [busy.url, idle.url])
    (tmp_path / "in.png").write_bytes(solid_png(200, 120))
    run = run_main("--config", config, "edit", "in.png", "make it blue", "--json", "-o", "a.png",
                   "--count", "3", "--strength", "0.4")
    assert run.code == 0, run
    records = [json.loads(line) for line in run.lines]
    assert busy.uploads == [] and len(idle.uploads) == 1      # on the host that runs the job
    upload = idle.uploads[0]
    assert upload["type"] == "input" and upload["overwrite"] == "false" and upload["outcome"] == "new"
    assert upload["size"] == len(solid_png(200, 120))
    workflow = idle.workflow()
    assert {workflow[n]["class_type"] for n in workflow} >= {"LoadImage", "VAEEncode", "KSampler"}
    loads = [n for n in workflow if workflow[n]["class_type"] == "LoadImage"]
    assert [workflow[n]["inputs"]["image"] for n in loads] == [upload["name"]]
    sampler = next(info for info in workflow.values() if info["class_type"] == "KSampler")
    assert sampler["inputs"]["denoise"] == 0.4
    assert [(r["width"], r["height"]) for r in records] == [(208, 128)] * 3  # rounded to 16
    assert records[0]["strength"] == 0.4 and records[0]["inputs"][0]["width"] == 200
    # a second run with the same bytes: the server keeps one file
    run = run_main("--config", config, "edit", "in.png", "again", "-o", "b.png")
    assert run.code == 0 and [u["outcome"] for u in idle.uploads] == ["new", "duplicate"]
    # no image: the text workflow, no upload
    run = run_main("--config", config, "generate", "x", "-o", "c.png", "--size", "64x64")
    assert run.code == 0 and len(idle.uploads) == 2
    assert "LoadImage" not in {info["class_type"] for info in idle.workflow().values()}
    sampler = next(info for info in idle.workflow().values() if info["class_type"] == "KSampler")
    assert sampler["inputs"]["denoise"] == 1.0


def test_comfyui_edit_workflow_of_your_own_takes_image_placeholders(
        run_main, write_config, comfyui, tmp_path):
    server = comfyui()
    edit = {"1": {"class_type": "LoadImage", "inputs": {"image": "{{image1}}"}},
            "2": {"class_type": "LoadImage", "inputs": {"image": "{{image2}}"}},
            "3": {"class_type": "ImageBlur", "inputs": {"image": ["2", 0], "blur_radius": 1,
                                                         "sigma": 1.0}},
            "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "{{filename_prefix}}",
                                                        "images": ["3", 0]}}}
    path = user_workflow(tmp_path, edit, "edit.json")
    config = comfy_config(write_config, server.url, edit_workflow=str(path))
    (tmp_path / "a.png").write_bytes(solid_png(64, 64))
    (tmp_path / "b.png").write_bytes(solid_png(96, 80))
    run = run_main("--config", config, "generate", "x", "-i", "a.png", "-i", "b.png", "-o", "o.png",
                   "--json", "--strength", "0.5")
    assert run.code == 0, run
    assert "ignores --strength" in run.err                      # no {{strength}} in it
    names = [u["name"] for u in server.uploads]
    workflow = server.workflow()
    assert [workflow["1"]["inputs"]["image"], workflow["2"]["inputs"]["image"]] == names
    assert (json.loads(run.out)["width"], json.loads(run.out)["height"]) == (96, 80)
    run = run_main("--config", config, "generate", "x", "-i", "a.png", "-o", "o.png")
    assert run.code == 2 and "takes 2 input images" in run.err and len(server.posted_prompts()) == 1
    run = run_main("--config", config, "generate", "x", *["-i", "a.png"] * 3, "-o", "o.png")
    assert run.code == 2 and "backend flux takes at most 2 input images; 3 given" in run.err
    config = comfy_config(write_config, server.url, workflow=str(user_workflow(
        tmp_path, FakeComfyUI.sample_workflow())))
    run = run_main("--config", config, "generate", "x", "-i", "a.png", "-o", "o.png")
    assert run.code == 2 and "takes no input image" in run.err and "edit_workflow" in run.err


def test_comfyui_failed_upload_is_exit_1_naming_the_file_and_the_host(
        run_main, write_config, comfyui, tmp_path):
    server = comfyui(reject_upload=(400, b""))
    (tmp_path / "in.png").write_bytes(solid_png(64, 64))
    run = run_main("--config", comfy_config(write_config, server.url), "edit", "in.png", "x",
                   "-o", "o.png")
    assert run.code == 1 and str(tmp_path / "in.png") in run.err and server.url in run.err
    assert server.posted_prompts() == [] and not (tmp_path / "o.png").exists()


def test_comfyui_loadimage_naming_a_missing_image_is_said_clearly(
        run_main, write_config, comfyui, tmp_path):
    server = comfyui()
    workflow = dict(FakeComfyUI.sample_workflow(), **{
        "5": {"class_type": "LoadImage", "inputs": {"image": "not-uploaded.png"}}})
    config = comfy_config(write_config, server.url, workflow=str(user_workflow(tmp_path, workflow)))
    run, _ = comfy_generate(run_main, config, "--size", "64x64")
    assert run.code == 1
    assert "has no input image 'not-uploaded.png'" in run.err and "Invalid image file" in run.err
    assert "node 5" in run.err and server.url in run.err


# ===== Ledger, usage rows and cloud sync (Supabase) =====

from conftest import HANG, OWNER_ID, SERVICE_KEY, is_canonical_uuid, storage_error  # noqa: E402

IMAGE_COLUMNS = ["id", "owner_user_id", "storage_path", "prompt", "prompt_sha256", "backend",
                 "model", "seed", "steps", "width", "height", "latency_ms", "cost_usd",
                 "sidecar", "tags", "created_at"]
USAGE_COLUMNS = ["id", "created_at", "backend", "model", "latency_ms", "cost_usd",
                 "prompt_sha256", "caller"]


def ledger_rows(env):
    """The ledger read with plain sqlite3, not through imagen."""
    import sqlite3
    db = sqlite3.connect(os.path.join(env["XDG_DATA_HOME"], "imagen", "ledger.db"))
    db.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in db.execute("SELECT * FROM generations ORDER BY rowid")]
    finally:
        db.close()


def cloud_config(write_config, mode="auto", owner=OWNER_ID, timeout=5, extra=""):
    return write_config('owner_user_id: "%s"\noutput:\n  cloud_sync: %s\n'
                        'cloud:\n  timeout: %s\n%s' % (owner, mode, timeout, extra))


def sha256_of(data):
    import hashlib
    return hashlib.sha256(data).hexdigest()


def today():
    import time
    return time.strftime("%Y-%m-%d")


class PaidMock(imagen.MockAdapter):
    """The mock, billed: stands in for a paid adapter such as Replicate."""
    NAME = "paid-mock"
    PAID = True

    def generate(self, request, deadline):
        result = super().generate(request, deadline)
        result.cost_usd = 0.003
        return result


@pytest.fixture
def paid(monkeypatch, write_config):
    monkeypatch.setitem(imagen.ADAPTERS, "paid-mock", PaidMock)
    return write_config("cloud:\n  timeout: 5\nbackends:\n  paid:\n    adapter: paid-mock\n",
                        name="paid.yaml")


def uploads(supabase):
    return [r for r in supabase.requests if r.path.startswith("/storage/v1/object/imagen")]


def inserts(supabase, table="images"):
    return [r for r in supabase.requests if r.method == "POST" and r.path == "/rest/v1/" + table]


# ----- the local ledger -----

def test_every_generation_gets_a_ledger_row(run_main, env, tmp_path):
    run = run_main("generate", "a red fox", "--seed", "42", "-o", "fox.png", "--json",
                   extra_env={"MAI_FROM_ID": "agent-7"})
    record = json.loads(run.out)
    [row] = ledger_rows(env)
    assert row["path"] == str(tmp_path / "fox.png")
    assert row["sha256"] == sha256_of((tmp_path / "fox.png").read_bytes()) == record["sha256"]
    assert row["prompt_sha256"] == sha256_of(b"a red fox")
    expected = {"backend": "mock", "adapter": "mock", "model": "mock-gradient-1",
                "cost_usd": 0.0, "caller": "agent-7", "seed": 42, "width": 1024,
                "height": 1024, "cloud": "off", "storage_path": None, "error": None,
                "created_at": record["created_at"], "latency_ms": record["latency_ms"]}
    assert {key: row[key] for key in expected} == expected
    assert len(row["id"]) == 36 and row["id"][14] == "4"
    assert "a red fox" not in json.dumps({k: v for k, v in row.items() if k != "record"})


def test_ledger_lives_under_xdg_data_home():
    assert imagen.ledger_path({"XDG_DATA_HOME": "/d", "HOME": "/h"}) == "/d/imagen/ledger.db"
    assert imagen.ledger_path({"HOME": "/h"}) == "/h/.local/share/imagen/ledger.db"


def test_ledger_uses_wal_and_a_busy_timeout(run_main, env):
    import sqlite3
    run_main("generate", "x", "-o", "a.png")
    db = sqlite3.connect(imagen.ledger_path(env))
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    with imagen.open_ledger(env) as ledger:
        assert ledger.db.execute("PRAGMA busy_timeout").fetchone()[0] >= 10000


def test_twenty_concurrent_generates_lose_no_ledger_row(env, tmp_path):
    # 20 processes, each its own SQLite connection; they import imagen from its bytecode (as
    # the installed launcher does) and make 64x64 images, which leaves the ledger's work,
    # where the race is, the most of what each does (compiling imagen.py was two thirds)
    import py_compile
    import shutil
    lib = tmp_path / "lib"
    lib.mkdir()
    shutil.copy(IMAGEN, str(lib / "imagen.py"))
    py_compile.compile(str(lib / "imagen.py"), doraise=True)
    launch = [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv.pop(1)); "
              "import imagen; sys.exit(imagen.main())", str(lib)]
    procs = [subprocess.Popen(launch + ["generate", "fox %d" % i, "--size", "64x64", "-o",
                                        str(tmp_path / ("f%d.png" % i))], env=env, cwd=str(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(20)]
    results = [proc.communicate(timeout=60) + (proc.returncode,) for proc in procs]
    assert all(code == 0 and err == b"" for _, err, code in results), results
    rows = ledger_rows(env)
    assert sorted(row["path"] for row in rows) == sorted(str(tmp_path / ("f%d.png" % i))
                                                         for i in range(20))
    assert len({row["id"] for row in rows}) == 20


def test_a_ledger_that_cannot_be_written_is_one_warning_and_exit_0(run_main, tmp_path):
    (tmp_path / "blocked").write_text("a file where the data directory should be")
    run = run_main("generate", "x", "-o", "a.png",
                   extra_env={"XDG_DATA_HOME": str(tmp_path / "blocked")})
    assert run.code == 0 and (tmp_path / "a.png").exists()
    assert run.err.startswith("imagen: ledger: ") and run.err.count("\n") == 1


def test_an_older_ledger_gains_job_key_and_parent_in_place_once(env, tmp_path):
    """A version-1 ledger opened by two processes at once: both come through, the row
    stays, and the columns and indexes of version 3 are there."""
    import sqlite3
    import threading
    path = imagen.ledger_path(env)
    os.makedirs(os.path.dirname(path))
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(LEDGER_VERSION_1_SQL)
    db.execute("INSERT INTO generations (id, path, backend, created_at, record) "
               "VALUES ('old', 'a.png', 'mock', '2026-01-01T00:00:00+00:00', '{}')")
    db.close()
    errors = []

    def upgrade():
        try:
            imagen.open_ledger(env).close()
        except Exception as exc:      # pragma: no cover - the assertion shows it
            errors.append(exc)
    threads = [threading.Thread(target=upgrade) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    [row] = ledger_rows(env)
    assert (row["id"], row["job_key"], row["parent"], row["rejected"]) == ("old", None, None, 0)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == imagen.LEDGER_VERSION == 3
    indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"generations_job_key", "generations_created"} <= indexes
    db.close()


def test_the_record_id_is_the_id_of_its_ledger_row_and_parent_is_kept(run_main, env):
    first = json.loads(run_main("generate", "x", "-o", "a.png", "--json").out)
    assert is_canonical_uuid(first["id"]) and first["parent"] is None
    # generate() keeps the restructure's keywords: a parent comes from `--from`
    assert run_main("generate", "--from", first["id"], "y", "-o", "b.png").code == 0
    rows = ledger_rows(env)
    assert [row["id"] for row in rows][0] == first["id"]
    assert (rows[1]["parent"], json.loads(rows[1]["record"])["parent"]) == (first["id"],) * 2


def test_an_image_that_cannot_be_written_still_records_its_cost(run_main, supabase, paid, env,
                                                                tmp_path, monkeypatch):
    no_space(monkeypatch)
    run = run_main("--config", paid, "generate", "x", "--backend", "paid", "-o", "a.png",
                   "--count", "2", extra_env=supabase.env)
    assert run.code == 1 and run.out == "", run
    assert run.err == ("imagen: cannot write %s: No space left on device; the image is lost, "
                       "its cost ($0.003) is in the ledger\n" % (tmp_path / "a.png"))
    [row] = ledger_rows(env)
    assert (row["path"], row["cost_usd"], row["cloud"]) == (str(tmp_path / "a.png"), 0.003, "off")
    assert row["error"] == "cannot write %s: No space left on device" % (tmp_path / "a.png")
    [usage] = supabase.rows("mai.imagen_usage")
    assert usage["id"] == row["id"] and usage["cost_usd"] == 0.003
    assert listing(tmp_path) == ["paid.yaml"]   # no temp file left behind
    report = json.loads(run_main("usage", "--local", "--json").out)
    assert report["groups"][0]["cost_usd"] == 0.003


# ----- cloud sync mode -----

@pytest.mark.parametrize("configured,env_value,flag,expected", [
    ("on", "", None, "on"),
    ("on", "off", None, "off"),
    ("off", "on", None, "on"),
    ("off", "auto", None, "auto"),
    ("on", "on", "off", "off"),       # --no-cloud wins
    ("auto", "", "off", "off"),
])
def test_cloud_sync_mode_precedence_config_then_env_then_flag(configured, env_value, flag,
                                                             expected):
    config = imagen.Config(imagen.merge_defaults({"output": {"cloud_sync": configured}}),
                           "x.yaml", True)
    mode, _ = imagen.cloud_sync_mode(config, {"IMAGEN_CLOUD_SYNC": env_value}, flag)
    assert mode == expected


def test_bad_imagen_cloud_sync_value_is_exit_2_before_generating(run_main, tmp_path):
    run = run_main("generate", "x", "-o", "a.png", extra_env={"IMAGEN_CLOUD_SYNC": "yes"})
    assert run.code == 2 and run.err == ("imagen: IMAGEN_CLOUD_SYNC must be auto, on or off "
                                         "(got 'yes')\n")
    assert listing(tmp_path) == []


def test_cloud_sync_on_without_credentials_is_exit_2_before_generating(run_main, tmp_path, env):
    run = run_main("generate", "x", "-o", "a.png", extra_env={"IMAGEN_CLOUD_SYNC": "on"})
    assert run.code == 2
    assert run.err == ("imagen: cloud sync is on (IMAGEN_CLOUD_SYNC) but SUPABASE_URL and "
                       "SUPABASE_SERVICE_KEY (or MAI_SUPABASE_KEY) and owner_user_id in the "
                       "config are not set\n")
    assert listing(tmp_path) == [] and not os.path.exists(imagen.ledger_path(env))


def test_cloud_sync_on_without_owner_is_exit_2(run_main, supabase, tmp_path):
    run = run_main("generate", "x", "-o", "a.png",
                   extra_env=dict(supabase.env, IMAGEN_CLOUD_SYNC="on"))
    assert run.code == 2 and "owner_user_id in the config is not set" in run.err
    assert supabase.requests == [] and listing(tmp_path) == []


def test_auto_without_owner_or_credentials_does_not_sync(run_main, supabase, write_config, env):
    path = write_config("cloud:\n  timeout: 5\n")
    run = run_main("--config", path, "generate", "x", "-o", "a.png", extra_env=supabase.env)
    assert run.code == 0 and run.err == "" and supabase.requests == []
    run = run_main("--config", cloud_config(write_config), "generate", "x", "-o", "b.png")
    assert run.code == 0 and run.err == ""
    assert [row["cloud"] for row in ledger_rows(env)] == ["off", "off"]


def test_no_cloud_flag_skips_the_sync(run_main, supabase, write_config, env):
    path = cloud_config(write_config, mode="on")
    run = run_main("--config", path, "generate", "x", "-o", "a.png", "--no-cloud",
                   extra_env=supabase.env)
    assert run.code == 0 and supabase.requests == []
    assert ledger_rows(env)[0]["cloud"] == "off"


def test_no_cloud_flag_wins_over_cloud_sync_on_with_an_empty_owner(run_main, supabase,
                                                                   write_config, env,
                                                                   tmp_path):
    path = cloud_config(write_config, mode="on", owner="")
    run = run_main("--config", path, "generate", "x", "-o", "a.png", "--no-cloud",
                   extra_env=supabase.env)
    assert run.code == 0 and run.err == "", run
    run = run_main("--config", path, "generate", "x", "-o", "b.png",
                   extra_env=dict(supabase.env, IMAGEN_CLOUD_SYNC="off"))
    assert run.code == 0 and run.err == "", run
    assert [row["cloud"] for row in ledger_rows(env)] == ["off", "off"]
    assert supabase.requests == []
    run = run_main("--config", path, "generate", "x", "-o", "c.png", extra_env=supabase.env)
    assert run.code == 2 and run.err == ("imagen: cloud sync is on (output.cloud_sync) but "
                                         "owner_user_id in the config is not set\n")
    assert not (tmp_path / "c.png").exists()
    assert run_main("--config", path, "usage", "--local").code == 0    # needs no owner


def test_validate_checks_owner_user_id_against_cloud_sync(run_main, write_config):
    run = run_main("--config", cloud_config(write_config, mode="on", owner=""), "config", "validate")
    assert run.code == 2 and "owner_user_id: is empty but output.cloud_sync is on" in run.err
    path = cloud_config(write_config, mode="auto", owner="")
    run = run_main("--config", path, "config", "validate")
    assert run.code == 0 and "warning" in run.err and "owner_user_id: is empty, so cloud " \
        "sync (auto) stays off" in run.err
    run = run_main("--config", path, "generate", "x", "-o", "a.png")
    assert run.code == 0 and run.err == ""     # validate says it; not every generate
    run = run_main("--config", cloud_config(write_config, mode="off", owner=""), "config", "validate")
    assert run.code == 0 and "owner_user_id" not in run.err
    run = run_main("--config", cloud_config(write_config, owner="m"), "config", "validate")
    assert run.code == 2 and "owner_user_id: must be a UUID" in run.err


# ----- cloud sync: the happy path -----

def test_generate_uploads_the_image_then_inserts_its_row(run_main, supabase, write_config,
                                                         env, tmp_path):
    run = run_main("--config", cloud_config(write_config), "generate", "a red fox", "--seed",
                   "42", "-o", "fox.png", extra_env=supabase.env)
    assert run.code == 0 and run.err == "", run
    data = (tmp_path / "fox.png").read_bytes()
    sidecar = json.loads((tmp_path / "fox.png.json").read_text())
    key = "%s/fox.png" % sidecar["created_at"][:10]
    assert supabase.objects() == {key: (data, "image/png")}
    [upload] = uploads(supabase)
    assert (upload.method, upload.headers["x-upsert"]) == ("POST", "true")
    assert upload.headers["apikey"] == SERVICE_KEY
    assert upload.headers["authorization"] == "Bearer " + SERVICE_KEY
    [insert] = inserts(supabase)
    assert insert.headers["content-profile"] == "imagen"
    assert "resolution=ignore-duplicates" in insert.headers["prefer"]
    assert insert.query["on_conflict"] == ["id"]
    [row] = supabase.rows("imagen.images")
    assert list(insert.json()[0]) == IMAGE_COLUMNS
    [ledger] = ledger_rows(env)
    assert row == {"id": ledger["id"], "owner_user_id": OWNER_ID, "storage_path": key,
                   "prompt": "a red fox", "prompt_sha256": sha256_of(b"a red fox"),
                   "backend": "mock", "model": "mock-gradient-1", "seed": 42,
                   "steps": sidecar["steps"], "width": 1024, "height": 1024,
                   "latency_ms": sidecar["latency_ms"], "cost_usd": 0.0, "sidecar": sidecar,
                   "tags": [], "created_at": sidecar["created_at"]}
    assert (ledger["cloud"], ledger["storage_path"], ledger["error"]) == ("synced", key, None)
    assert supabase.server.connections == 1      # upload and insert share one connection


def test_count_syncs_each_image_with_its_own_id_over_one_connection(run_main, supabase,
                                                                    write_config, env):
    run = run_main("--config", cloud_config(write_config), "generate", "x", "--count", "3",
                   "-o", "a.png", extra_env=supabase.env)
    assert run.code == 0 and run.err == ""
    ids = [row["id"] for row in ledger_rows(env)]
    assert len(set(ids)) == 3
    assert sorted(row["id"] for row in supabase.rows("imagen.images")) == sorted(ids)
    assert sorted(supabase.objects()) == ["%s/%s" % (today(), name)
                                          for name in ("a-2.png", "a-3.png", "a.png")]
    assert supabase.server.connections == 1


def test_storage_path_date_is_the_local_date_of_created_at(run_main, supabase, write_config,
                                                           tmp_path):
    run_main("--config", cloud_config(write_config), "generate", "x", "-o", "a.png",
             extra_env=dict(supabase.env, TZ="Pacific/Kiritimati"))
    created = json.loads((tmp_path / "a.png.json").read_text())["created_at"]
    assert list(supabase.objects()) == ["%s/a.png" % created[:10]]


def test_storage_key_is_percent_encoded_in_the_url(run_main, supabase, write_config, tmp_path):
    run_main("--config", cloud_config(write_config), "generate", "x", "-o", "a fox+1.png",
             extra_env=supabase.env)
    [upload] = uploads(supabase)
    assert upload.raw_path.endswith("/a%20fox%2B1.png")
    assert [key.split("/")[1] for key in supabase.objects()] == ["a fox+1.png"]


@pytest.mark.parametrize("name", ["caf\u00e9.png", "a#b.png", "100%.png"])
def test_a_name_that_cannot_be_a_storage_key_fails_before_any_request(run_main, supabase,
                                                                    write_config, env, name):
    run = run_main("--config", cloud_config(write_config), "generate", "x", "-o", name,
                   extra_env=supabase.env)
    assert run.code == 0 and supabase.requests == []
    assert run.err.startswith("imagen: cloud sync: ") and "cannot be a Storage object key" in run.err
    assert ledger_rows(env)[0]["cloud"] == "failed"


def test_a_jpeg_or_webp_is_uploaded_with_its_own_content_type(run_main, supabase, write_config,
                                                              monkeypatch, tmp_path):
    jpeg = (b"\xff\xd8\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + b"\x00" * 9
            + b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 64, 64, 1) + b"\x01\x11\x00\xff\xd9")
    monkeypatch.setattr(imagen, "mock_png", lambda *a: jpeg)
    run = run_main("--config", cloud_config(write_config), "generate", "x", "-o", "a.jpg",
                   extra_env=supabase.env)
    assert run.code == 0 and run.err == ""
    [(data, content_type)] = supabase.objects().values()
    assert (data, content_type) == (jpeg, "image/jpeg")


# ----- cloud sync: failures -----

def assert_cloud_failure(run, tmp_path, env, state, text):
    assert run.code == 0, run
    assert run.err.count("\n") == 1 and run.err.startswith("imagen: cloud sync: "), run.err
    assert text in run.err
    record = json.loads((tmp_path / "a.png.json").read_text())
    assert sha256_of((tmp_path / "a.png").read_bytes()) == record["sha256"]   # untouched
    assert ledger_rows(env)[0]["cloud"] == state


def test_storage_5xx_is_retried_then_succeeds(run_main, supabase, write_config, env, fake_clock):
    supabase.script("POST", "/storage/v1/object/", storage_error("500", "Internal", "boom",
                                                                 http=500))
    run = run_main("--config", cloud_config(write_config), "generate", "x", "-o", "a.png",
                   extra_env=supabase.env)
    assert run.code == 0 and run.err == ""
    assert len(uploads(supabase)) == 2 and len(supabase.objects()) == 1
    assert ledger_rows(env)[0]["cloud"] == "synced"


def test_storage_4xx_is_not_retried_and_fails_with_the_body_status(run_main, supabase,
                                                                  write_config, env, tmp_path):
    supabase.script("POST", "/storage/v1/object/", storage_error(
        "403", "Unauthorized", "new row violates row-level security policy"))
    run = run_main("--config", cloud_config(write_config), "generate", "x", "-o", "a.png",
                   extra_env=supabase.env)
    assert_cloud_failure(run, tmp_path, env, "failed", "HTTP 400 (statusCode 403): "
                         "Unauthorized: new row violates row-level security policy")
    assert len(uploads(supabase)) == 1 and inserts(supabase) == []   # no upload, no row


def test_storage_http_400_with_a_retryable_status_code_is_retried(run_main, supabase,
                                                                  write_config, env, fake_clock):
    supabase.script("POST", "/storage/v1/object/",
                    storage_error("503", "Service Unavailable", "try again"))
    run = run_main("--config", cloud_config(write_config), "generate", "x", "-o", "a.png",
                   extra_env=supabase.env)
    assert run.code == 0 and run.err == ""
    assert len(uploads(supabase)) == 2 and ledger_rows(env)[0]["cloud"] == "synced"


def test_a_missing_bucket_is_reported_once(run_main, supabase, write_config, env, tmp_path):
    path = cloud_config(write_config, extra="  bucket: nope\n")
    run = run_main("--config", path, "generate", "x", "-o", "a.png", extra_env=supabase.env)
    assert_cloud_failure(run, tmp_path, env, "failed",
                         "upload nope/%s/a.png: HTTP 400 (statusCode 404): Bucket not found\n"
                         % today())


def test_insert_failure_after_upload_is_partial_then_sync_finishes_it(run_main, supabase,
                                                                     write_config, env,
                                                                     tmp_path):
    supabase.script("POST", "/rest/v1/images", (403, {}, {
        "code": "42501", "message": "permission denied for table images", "details": None,
        "hint": None}))
    path = cloud_config(write_config)
    run = run_main("--config", path, "generate", "x", "-o", "a.png", extra_env=supabase.env)
    assert_cloud_failure(run, tmp_path, env, "partial", "uploaded %s/a.png, but insert into "
                         "imagen.images: HTTP 403 (42501): permission denied" % today())
    assert len(supabase.objects()) == 1 and supabase.rows("imagen.images") == []
    run = run_main("--config", path, "sync", extra_env=supabase.env)
    assert run.code == 0 and run.err == ""
    assert run.lines == ["synced %s -> %s/a.png" % (tmp_path / "a.png", today()),
                         "sync: 1 synced, 0 failed"]
    assert len(uploads(supabase)) == 1           # the object was there: no second upload
    assert len(supabase.rows("imagen.images")) == 1
    assert ledger_rows(env)[0]["cloud"] == "synced"
    assert run_main("--config", path, "sync", extra_env=supabase.env).out == "sync: nothing to do\n"


def test_a_hanging_supabase_never_hangs_imagen(run_main, supabase, write_config, env, tmp_path,
                                               fake_clock, asked):
    # each hang is silent past any deadline on the test's clock (a Stall), and the test
    # asserts that the whole cloud step had one deadline of the 0.5 s timeout
    supabase.script("POST", "/storage/v1/object/", HANG, HANG, HANG, HANG, HANG)
    run = run_main("--config", cloud_config(write_config, timeout=0.5), "generate", "x",
                   "-o", "a.png", extra_env=supabase.env)
    assert_cloud_failure(run, tmp_path, env, "failed", "timed out")
    assert_one_deadline(asked, 0.5)


def assert_one_deadline(asked, seconds):
    """Every request was made under one deadline, `seconds` from the first of them."""
    assert asked and {call.deadline for call in asked} == {asked[0].deadline}
    assert asked[0].deadline <= asked[0].at + seconds


@pytest.mark.parametrize("command", ["generate", "usage", "url"])
def test_a_refused_supabase_connection_is_reported_as_refused(run_main, write_config, env,
                                                              command, fake_clock):
    path = cloud_config(write_config, timeout=0.5)
    down = {"SUPABASE_URL": refused_url(), "SUPABASE_SERVICE_KEY": SERVICE_KEY}
    if command == "url":                     # an image the ledger does not know: signed
        run_main("--config", path, "generate", "x", "-o", "a.png", "--no-cloud")
        os.unlink(imagen.ledger_path(env))
    args = {"generate": ["generate", "x", "-o", "a.png"], "usage": ["usage"],
            "url": ["url", "a.png"]}[command]
    fake_clock.slept[:] = []
    run = run_main("--config", path, *args, extra_env=dict(down, IMAGEN_CLOUD_SYNC="on"))
    assert sum(fake_clock.slept) < 0.5        # its retries kept within the 0.5 s timeout
    expected = {"generate": "cloud sync: upload imagen-generated/%s/a.png" % today(),
                "usage": "usage: read mai.imagen_usage",
                "url": "url: sign in bucket imagen-generated"}[command]
    assert run.err == "imagen: %s: connection refused\n" % expected


def insert_after_a_429(run_main, supabase, write_config, retry_after):
    """A generate whose row insert is first answered 429 with this Retry-After, then taken."""
    supabase.script("POST", "/rest/v1/images", (429, {"Retry-After": retry_after}, {
        "code": None, "message": "Too Many Requests", "details": None, "hint": None}))
    run = run_main("--config", cloud_config(write_config), "generate", "x", "-o", "a.png",
                   extra_env=supabase.env)
    assert run.code == 0 and run.err == "", run
    first, second = inserts(supabase)
    assert first.received <= second.received


def test_429_retry_after_is_honoured(run_main, supabase, write_config, env, fake_clock):
    insert_after_a_429(run_main, supabase, write_config, "1")
    assert fake_clock.slept == [1.0]                      # not the 0.25..0.5 s backoff
    assert ledger_rows(env)[0]["cloud"] == "synced" and len(supabase.rows("imagen.images")) == 1


def test_a_negative_retry_after_waits_the_normal_backoff(run_main, supabase, write_config, env,
                                                         fake_clock):
    insert_after_a_429(run_main, supabase, write_config, "-3")
    [backoff] = fake_clock.slept
    assert 0.25 <= backoff <= 0.5                          # the 0.25..0.5 s backoff, not 0


def test_a_refused_supabase_connection_leaves_the_image_failed_not_timed_out(
        run_main, write_config, env, tmp_path, fake_clock):
    run = run_main("--config", cloud_config(write_config, timeout=0.5), "generate", "x", "-o",
                   "a.png", extra_env={"SUPABASE_URL": refused_url(),
                                       "SUPABASE_SERVICE_KEY": SERVICE_KEY})
    assert_cloud_failure(run, tmp_path, env, "failed", "connection refused")
    assert "timed out" not in run.err


def test_a_retry_after_past_the_deadline_fails_at_once(run_main, supabase, write_config, env,
                                                       tmp_path):
    supabase.script("POST", "/storage/v1/object/", (429, {"Retry-After": "60"}, {
        "statusCode": "429", "error": "too_many_requests", "message": "slow down"}))
    run = run_main("--config", cloud_config(write_config, timeout=2), "generate", "x", "-o",
                   "a.png", extra_env=supabase.env)
    assert_cloud_failure(run, tmp_path, env, "failed", "HTTP 429")
    assert len(uploads(supabase)) == 1


def test_wrong_key_is_reported_without_the_key(run_main, supabase, write_config, env, tmp_path):
    run = run_main("--config", cloud_config(write_config), "generate", "x", "-o", "a.png",
                   extra_env=dict(supabase.env, SUPABASE_SERVICE_KEY="wrong-key-123"))
    assert_cloud_failure(run, tmp_path, env, "failed", "HTTP 401: Invalid API key")
    assert "wrong-key-123" not in run.err


def test_mai_supabase_key_is_accepted_too(run_main, supabase, write_config, env):
    extra = {"SUPABASE_URL": supabase.url, "MAI_SUPABASE_KEY": SERVICE_KEY}
    run = run_main("--config", cloud_config(write_config), "generate", "x", "-o", "a.png",
                   extra_env=extra)
    assert run.code == 0 and run.err == "" and ledger_rows(env)[0]["cloud"] == "synced"


# ----- usage rows -----

def test_paid_adapter_inserts_one_usage_row_without_the_prompt(run_main, supabase, paid, env):
    run = run_main("--config", paid, "generate", "a secret plan", "--backend", "paid", "-o",
                   "a.png", "--json", extra_env=dict(supabase.env, MAI_FROM_ID="agent-7"))
    assert run.code == 0 and run.err == "", run
    record = json.loads(run.out)
    [insert] = inserts(supabase, "imagen_usage")
    assert insert.headers["content-profile"] == "mai"
    assert "resolution=ignore-duplicates" in insert.headers["prefer"]
    assert b"a secret plan" not in insert.body
    [row] = supabase.rows("mai.imagen_usage")
    assert list(insert.json()[0]) == USAGE_COLUMNS
    assert row == {"id": ledger_rows(env)[0]["id"], "created_at": record["created_at"],
                   "backend": "paid", "model": "mock-gradient-1",
                   "latency_ms": record["latency_ms"], "cost_usd": 0.003,
                   "prompt_sha256": sha256_of(b"a secret plan"), "caller": "agent-7"}


def test_a_retried_usage_insert_never_doubles_a_row(run_main, supabase, paid, fake_clock):
    supabase.script("POST", "/rest/v1/imagen_usage", (503, {}, {"message": "unavailable"}))
    run = run_main("--config", paid, "generate", "x", "--backend", "paid", "-o", "a.png",
                   extra_env=supabase.env)
    assert run.code == 0 and run.err == ""
    first, second = inserts(supabase, "imagen_usage")
    assert first.json()[0]["id"] == second.json()[0]["id"]
    assert len(supabase.rows("mai.imagen_usage")) == 1


def test_a_free_adapter_inserts_no_usage_row(run_main, supabase):
    run = run_main("generate", "x", "-o", "a.png", extra_env=supabase.env)
    assert run.code == 0 and supabase.requests == []


def test_usage_row_failure_is_one_warning(run_main, supabase, paid, tmp_path):
    supabase.script("POST", "/rest/v1/imagen_usage", (404, {}, {
        "code": "PGRST205", "message": "Could not find the table 'mai.imagen_usage' in the "
        "schema cache", "details": None, "hint": None}))
    run = run_main("--config", paid, "generate", "x", "--backend", "paid", "-o", "a.png",
                   extra_env=supabase.env)
    assert run.code == 0 and (tmp_path / "a.png").exists()
    assert run.err == ("imagen: usage: insert into mai.imagen_usage: HTTP 404 (PGRST205): "
                       "Could not find the table 'mai.imagen_usage' in the schema cache\n")


# ----- imagen sync -----

def test_sync_dry_run_lists_and_changes_nothing(run_main, supabase, write_config, env, tmp_path):
    path = cloud_config(write_config)
    supabase.script("POST", "/storage/v1/object/", storage_error("409", "Duplicate", "exists"))
    run_main("--config", path, "generate", "x", "-o", "a.png", extra_env=supabase.env)
    count = len(supabase.requests)
    run = run_main("--config", path, "sync", "--dry-run", extra_env=supabase.env)
    assert run.code == 0
    assert run.lines == ["would upload %s (failed)" % (tmp_path / "a.png"),
                         "sync: dry run: 1 to sync"]
    assert len(supabase.requests) == count and ledger_rows(env)[0]["cloud"] == "failed"


def test_sync_finishes_failed_uploads_idempotently(run_main, supabase, write_config, env,
                                                  tmp_path):
    path = cloud_config(write_config)
    for name in ("a.png", "b.png"):
        supabase.script("POST", "/storage/v1/object/", storage_error("403", "Unauthorized",
                                                                     "jwt expired"))
        run_main("--config", path, "generate", "x", "-o", name, extra_env=supabase.env)
    assert [row["cloud"] for row in ledger_rows(env)] == ["failed", "failed"]
    run = run_main("--config", path, "sync", extra_env=supabase.env)
    assert run.code == 0 and run.lines[-1] == "sync: 2 synced, 0 failed"
    assert len(supabase.objects()) == 2 and len(supabase.rows("imagen.images")) == 2
    assert {row["id"] for row in ledger_rows(env)} == {
        row["id"] for row in supabase.rows("imagen.images")}
    assert run_main("--config", path, "sync", extra_env=supabase.env).lines == [
        "sync: nothing to do"]


def test_sync_reports_each_failure_and_exits_1(run_main, supabase, write_config, env, tmp_path):
    path = cloud_config(write_config)
    supabase.script("POST", "/storage/v1/object/", storage_error("403", "Unauthorized", "no"))
    run_main("--config", path, "generate", "x", "-o", "a.png", extra_env=supabase.env)
    os.unlink(str(tmp_path / "a.png"))
    run = run_main("--config", path, "sync", extra_env=supabase.env)
    assert run.code == 1 and run.lines == ["sync: 0 synced, 1 failed"]
    assert run.err.startswith("imagen: sync: %s: " % (tmp_path / "a.png"))
    assert ledger_rows(env)[0]["error"].endswith("No such file or directory")


def test_sync_refuses_a_file_changed_since_it_was_generated(run_main, supabase, write_config,
                                                           tmp_path):
    path = cloud_config(write_config)
    supabase.script("POST", "/storage/v1/object/", storage_error("403", "Unauthorized", "no"))
    run_main("--config", path, "generate", "x", "-o", "a.png", extra_env=supabase.env)
    (tmp_path / "a.png").write_bytes(imagen.mock_png("other", 1, 64, 64))
    run = run_main("--config", path, "sync", extra_env=supabase.env)
    assert run.code == 1 and "changed since it was generated" in run.err
    assert supabase.objects() == {}


@pytest.mark.parametrize("name", ["caf\u00e9.png", "a#b.png"])
def test_a_name_storage_never_accepts_is_reported_once_then_skipped_by_sync(
        run_main, supabase, write_config, env, tmp_path, name):
    path = cloud_config(write_config)
    run = run_main("--config", path, "generate", "x", "-o", name, extra_env=supabase.env)
    assert run.code == 0 and run.err.count("\n") == 1, run
    assert "cannot be a Storage object key" in run.err and "imagen sync skips it" in run.err
    [row] = ledger_rows(env)
    assert (row["cloud"], row["rejected"]) == ("failed", 1)
    assert row["error"].endswith("cannot be a Storage object key (allowed: letters, digits "
                                 "and _/!.*'() &$=@;:+,?-)")
    run = run_main("--config", path, "sync", "--dry-run", extra_env=supabase.env)
    assert run.code == 0 and run.lines == [
        "skip %s (refused for good: %s)" % (tmp_path / name, row["error"]),
        "sync: dry run: 0 to sync, 1 skipped"]
    for _ in range(2):                    # every cron run after that: quiet, exit 0
        run = run_main("--config", path, "sync", extra_env=supabase.env)
        assert run.code == 0 and run.err == "" and run.lines == [
            "sync: nothing to do; 1 refused for good, skipped (imagen sync --dry-run says why)"]
    run = run_main("--config", path, "url", name, extra_env=supabase.env)
    assert run.code == 1 and run.err == "imagen: url: %s is not in the bucket (cloud sync: " \
        "rejected): %s\n" % (name, row["error"])
    assert supabase.requests == []


def test_storage_answering_invalid_key_is_a_terminal_state_too(run_main, supabase,
                                                               write_config, env, tmp_path):
    path = cloud_config(write_config)
    for name in ("a.png", "b.png"):
        supabase.script("POST", "/storage/v1/object/", storage_error(
            "400", "InvalidKey", "Invalid key: %s/%s" % (today(), name),
            "InvalidKey" if name == "a.png" else None))     # older servers send no `code`
        run = run_main("--config", path, "generate", "x", "-o", name, extra_env=supabase.env)
        assert run.code == 0 and "InvalidKey" in run.err and "imagen sync skips it" in run.err
    assert [(row["cloud"], row["rejected"]) for row in ledger_rows(env)] == [
        ("failed", 1), ("failed", 1)]
    run = run_main("--config", path, "sync", extra_env=supabase.env)
    assert run.code == 0 and run.lines[0].startswith("sync: nothing to do; 2 refused")
    assert len(uploads(supabase)) == 2                   # one each, never again


def test_a_refused_name_in_a_ledger_from_before_is_reported_once_by_sync(run_main, supabase,
                                                                         write_config, env,
                                                                         tmp_path):
    """A ledger made by the previous imagen (no `rejected` column) whose row failed on a
    bad name: the next sync says why once and marks it, later ones skip it."""
    import sqlite3
    path = cloud_config(write_config)
    run_main("--config", path, "generate", "x", "-o", "a#b.png", "--no-cloud",
             extra_env=supabase.env)
    [row] = ledger_rows(env)
    os.unlink(imagen.ledger_path(env))
    db = sqlite3.connect(imagen.ledger_path(env), isolation_level=None)
    db.executescript(LEDGER_VERSION_1_SQL)
    db.execute("INSERT INTO generations (id, path, backend, created_at, cloud, error, record) "
               "VALUES (?, ?, 'mock', ?, 'failed', 'cannot be a Storage object key', ?)",
               (row["id"], row["path"], row["created_at"], row["record"]))
    db.close()
    run = run_main("--config", path, "sync", extra_env=supabase.env)
    assert run.code == 1 and run.lines == ["sync: 0 synced, 1 failed"]
    assert run.err.startswith("imagen: sync: %s: " % (tmp_path / "a#b.png"))
    assert "cannot be a Storage object key" in run.err and "sync skips it from now on" in run.err
    [row] = ledger_rows(env)
    assert (row["cloud"], row["rejected"]) == ("failed", 1)
    run = run_main("--config", path, "sync", extra_env=supabase.env)
    assert run.code == 0 and run.err == "" and run.lines[0].startswith("sync: nothing to do;")
    assert supabase.requests == []


LEDGER_VERSION_1_SQL = """
CREATE TABLE generations (
    id TEXT PRIMARY KEY, path TEXT NOT NULL, sha256 TEXT, backend TEXT NOT NULL,
    adapter TEXT, model TEXT, cost_usd REAL, latency_ms INTEGER, prompt_sha256 TEXT,
    caller TEXT, created_at TEXT NOT NULL, seed INTEGER, width INTEGER, height INTEGER,
    cloud TEXT NOT NULL DEFAULT 'off'
          CHECK (cloud IN ('off', 'pending', 'synced', 'failed', 'partial')),
    storage_path TEXT, error TEXT, record TEXT NOT NULL);
CREATE INDEX generations_unsynced ON generations (cloud) WHERE cloud <> 'off';
CREATE INDEX generations_path ON generations (path);
PRAGMA user_version = 1;
"""


def test_sync_recheck_uploads_again_what_was_deleted_on_the_server(run_main, supabase,
                                                                   write_config, env,
                                                                   tmp_path):
    path = cloud_config(write_config)
    for name in ("a.png", "b.png", "c.png"):
        run_main("--config", path, "generate", name, "-o", name, extra_env=supabase.env)
    key = "%s/b.png" % today()
    del supabase.objects()[key]                        # someone deleted it in the dashboard
    assert run_main("--config", path, "sync", extra_env=supabase.env).lines == [
        "sync: nothing to do"]
    count = len(supabase.requests)
    run = run_main("--config", path, "sync", "--recheck", "--dry-run", extra_env=supabase.env)
    assert run.code == 0 and run.lines == [
        "sync: recheck: 2 in the bucket, 1 gone",
        "would upload %s (gone from the bucket)" % (tmp_path / "b.png"),
        "sync: dry run: 1 to sync"]
    assert key not in supabase.objects() and ledger_rows(env)[1]["cloud"] == "synced"
    [sign] = supabase.requests[count:]                 # one request checks them all
    assert sorted(sign.json()["paths"]) == ["%s/%s" % (today(), n)
                                            for n in ("a.png", "b.png", "c.png")]
    run = run_main("--config", path, "sync", "--recheck", extra_env=supabase.env)
    assert run.code == 0 and run.err == "", run
    assert run.lines == ["sync: recheck: 2 in the bucket, 1 gone",
                         "synced %s -> %s" % (tmp_path / "b.png", key),
                         "sync: 1 synced, 0 failed"]
    assert supabase.objects()[key][0] == (tmp_path / "b.png").read_bytes()
    assert [row["cloud"] for row in ledger_rows(env)] == ["synced"] * 3
    assert len(supabase.rows("imagen.images")) == 3       # the row was there: not doubled
    assert run_main("--config", path, "sync", "--recheck", extra_env=supabase.env).lines == [
        "sync: recheck: 3 in the bucket, 0 gone", "sync: nothing to do"]


def test_sync_without_credentials_is_exit_2(run_main, supabase, write_config):
    path = cloud_config(write_config)
    supabase.script("POST", "/storage/v1/object/", storage_error("403", "Unauthorized", "no"))
    run_main("--config", path, "generate", "x", "-o", "a.png", extra_env=supabase.env)
    run = run_main("--config", path, "sync")
    assert run.code == 2 and run.err.startswith("imagen: sync: SUPABASE_URL and ")

def test_ledger_rows_whose_record_is_not_json_are_counted_and_never_synced(
        run_main, supabase, write_config, env, tmp_path):
    path = cloud_config(write_config)
    for name in ("a.png", "b.png"):
        supabase.script("POST", "/storage/v1/object/", storage_error("403", "Unauthorized", "no"))
        run_main("--config", path, "generate", "x", "-o", name, extra_env=supabase.env)
    import sqlite3
    db = sqlite3.connect(imagen.ledger_path(env))
    db.execute("UPDATE generations SET record = 'not json' WHERE path LIKE '%a.png'")
    db.execute("UPDATE generations SET record = ? WHERE path LIKE '%b.png'", (deep_json(),))
    db.commit()
    db.close()
    run = run_main("usage", "--local", "--json")
    assert run.code == 0 and json.loads(run.out)["groups"][0]["count"] == 2, run
    run = run_main("--config", path, "sync", "--dry-run", extra_env=supabase.env)
    assert run.code == 0 and run.lines == [
        "would skip %s (its ledger record is not JSON)" % (tmp_path / name)
        for name in ("a.png", "b.png")] + ["sync: dry run: 2 to sync"]
    run = run_main("--config", path, "sync", extra_env=supabase.env)
    assert run.code == 1 and run.lines == ["sync: 0 synced, 2 failed"], run
    assert run.err.count("its ledger record is not JSON; left out of cloud sync") == 2
    assert supabase.objects() == {} and [row["cloud"] for row in ledger_rows(env)] == ["off"] * 2
    assert run_main("--config", path, "sync", extra_env=supabase.env).lines == [
        "sync: nothing to do"]


def test_sync_without_credentials_is_exit_2_even_with_nothing_to_do(run_main, write_config):
    path = cloud_config(write_config)
    for args in (["sync"], ["sync", "--dry-run"], ["sync", "--recheck"]):
        run = run_main("--config", path, *args)
        assert run.code == 2 and run.out == "" and run.err == (
            "imagen: sync: SUPABASE_URL and SUPABASE_SERVICE_KEY (or MAI_SUPABASE_KEY) are "
            "not set\n"), args


# ----- imagen url -----

def fetch(url):
    from urllib.request import urlopen
    with urlopen(url, timeout=10) as response:
        return response.read(), response.headers["Content-Type"]


def test_url_prints_a_signed_url_that_downloads_the_image(run_main, supabase, write_config,
                                                         tmp_path):
    path = cloud_config(write_config)
    run_main("--config", path, "generate", "x", "-o", "a fox.png", extra_env=supabase.env)
    run = run_main("--config", path, "url", "a fox.png", "--expires", "60",
                   extra_env=supabase.env)
    assert run.code == 0 and run.err == ""
    url = run.out.strip()
    assert url.startswith("%s/storage/v1/object/sign/imagen-generated/%s/a%%20fox.png?token="
                          % (supabase.url, today()))
    sign = [r for r in supabase.requests if r.path.startswith("/storage/v1/object/sign/")][0]
    assert sign.json() == {"expiresIn": 60, "paths": ["%s/a fox.png" % today()]}
    assert fetch(url) == ((tmp_path / "a fox.png").read_bytes(), "image/png")


@pytest.mark.parametrize("name", ["a&b.png", "a$b=c@d.png", "x;y:z+w,v.png",
                                  "what?x=1&y=2.png", "it's (1) a+b.png"])
def test_url_of_a_key_with_reserved_characters_downloads_the_image(run_main, supabase,
                                                                   write_config, tmp_path,
                                                                   name):
    from urllib.parse import quote
    path = cloud_config(write_config)
    run = run_main("--config", path, "generate", "x", "-o", name, extra_env=supabase.env)
    assert run.code == 0 and run.err == "", run
    key = "%s/%s" % (today(), name)
    assert list(supabase.objects()) == [key]
    run = run_main("--config", path, "url", name, extra_env=supabase.env)
    assert run.code == 0 and run.err == "", run
    url = run.out.strip()
    assert url.startswith("%s/storage/v1/object/sign/imagen-generated/%s?token="
                          % (supabase.url, quote(key, safe="/")))
    [sign] = [r for r in supabase.requests if r.path.startswith("/storage/v1/object/sign/")]
    assert sign.path == "/storage/v1/object/sign/imagen-generated"    # the batch form
    assert sign.json() == {"expiresIn": 3600, "paths": [key]}         # signs the raw key
    assert fetch(url) == ((tmp_path / name).read_bytes(), "image/png")


def test_fake_storage_signs_a_single_key_partly_decoded_like_the_real_one(supabase):
    """APIS.md: the single-key form signs `a%26b.png` as it stands, so its signed URL
    never works, however it is encoded; the batch form signs the raw key."""
    from urllib.error import HTTPError
    client = imagen.HttpClient()
    supabase.objects()["d/a&b.png"] = (b"png", "image/png")
    headers = {"apikey": supabase.key, "Authorization": "Bearer " + supabase.key,
               "Content-Type": "application/json"}
    try:
        single = client.request("POST", supabase.url + "/storage/v1/object/sign/"
                                "imagen-generated/d/a%26b.png", b'{"expiresIn": 60}', headers)
        signed = single.json()["signedURL"]
        assert signed.startswith("/object/sign/imagen-generated/d/a%26b.png?token=")
        for path in (signed, signed.replace("%26", "%2526"), signed.replace("%26", "&")):
            with pytest.raises(HTTPError) as failure:
                fetch(supabase.url + "/storage/v1" + path)
            assert json.loads(failure.value.read())["error"] in ("InvalidSignature",
                                                                   "not_found")
        batch = client.request("POST", supabase.url + "/storage/v1/object/sign/"
                               "imagen-generated", b'{"expiresIn": 60, "paths": '
                               b'["d/a&b.png", "d/none.png"]}', headers).json()
        assert [entry["path"] for entry in batch] == ["d/a&b.png", "d/none.png"]
        assert batch[1] == {"error": "Either the object does not exist or you do not have "
                            "access to it", "path": "d/none.png", "signedURL": None}
        token = batch[0]["signedURL"].rpartition("?token=")[2]
        assert fetch(supabase.url + "/storage/v1/object/sign/imagen-generated/d/a%26b.png"
                     "?token=" + token) == (b"png", "image/png")
    finally:
        client.close()


def test_url_without_a_ledger_row_uses_the_images_own_record(run_main, supabase, write_config,
                                                             env):
    path = cloud_config(write_config)
    run_main("--config", path, "generate", "x", "-o", "a.png", extra_env=supabase.env)
    os.unlink(imagen.ledger_path(env))
    run = run_main("--config", path, "url", "a.png", extra_env=supabase.env)
    assert run.code == 0 and "/object/sign/imagen-generated/%s/a.png?token=" % today() in run.out


def test_url_of_an_image_not_in_the_bucket_says_so(run_main, supabase, write_config):
    path = cloud_config(write_config)
    run_main("--config", path, "generate", "x", "-o", "a.png", "--no-cloud",
             extra_env=supabase.env)
    run = run_main("--config", path, "url", "a.png", extra_env=supabase.env)
    assert run.code == 1 and run.err == "imagen: url: a.png is not in the bucket (cloud sync: off)\n"
    run_main("--config", path, "generate", "y", "-o", "b.png", extra_env=supabase.env)
    supabase.objects().clear()
    run = run_main("--config", path, "url", "b.png", extra_env=supabase.env)
    assert run.code == 1 and "no object %s/b.png in bucket imagen-generated" % today() in run.err


def test_url_says_what_failed_gone_from_the_server_never_synced_or_bad_key(
        run_main, supabase, write_config, env):
    path = cloud_config(write_config)
    run_main("--config", path, "generate", "x", "-o", "a.png", extra_env=supabase.env)
    key = "%s/a.png" % today()
    del supabase.objects()[key]                       # deleted on the server
    run = run_main("--config", path, "url", "a.png", extra_env=supabase.env)
    assert run.code == 1 and run.err == (
        "imagen: url: a.png: no object %s in bucket imagen-generated: it was synced, then "
        "deleted on the server (imagen sync --recheck uploads it again)\n" % key)
    run = run_main("--config", path, "url", "a.png",
                   extra_env=dict(supabase.env, SUPABASE_SERVICE_KEY="wrong-key-123"))
    assert run.code == 1 and run.err == (
        "imagen: url: sign in bucket imagen-generated: HTTP 401: Invalid API key (check the "
        "service-role key in SUPABASE_SERVICE_KEY or MAI_SUPABASE_KEY)\n")
    os.unlink(imagen.ledger_path(env))                # an image this machine never synced
    run = run_main("--config", path, "url", "a.png", extra_env=supabase.env)
    assert run.code == 1 and run.err == (
        "imagen: url: a.png: no object %s in bucket imagen-generated, and the ledger here "
        "has no record of it: it was never synced from this machine\n" % key)


def test_url_needs_credentials_a_file_and_a_positive_expiry(run_main, supabase):
    run_main("generate", "x", "-o", "a.png")
    assert run_main("url", "a.png").code == 2
    assert run_main("url", "missing.png", extra_env=supabase.env).code == 2
    run = run_main("url", "a.png", "--expires", "0", extra_env=supabase.env)
    assert run.code == 2 and "--expires must be at least 1" in run.err


# ----- imagen usage -----

def usage_rows(count, start_day=1):
    rows = []
    for i in range(count):
        rows.append({"id": "00000000-0000-4000-8000-%012d" % i,
                     "created_at": "2026-05-%02dT10:%02d:%02d+00:00" % (
                         start_day + i % 14, i // 60 % 60, i % 60),
                     "backend": "flux-dev" if i % 2 else "flux-schnell",
                     "model": "m-%d" % (i % 2), "latency_ms": 1000 + i % 100,
                     "cost_usd": 0.025 if i % 2 else 0.003,
                     "prompt_sha256": "0" * 64, "caller": "agent-%d" % (i % 3)})
    return rows


def test_usage_reads_postgrest_in_pages_past_the_1000_row_cap(run_main, supabase):
    supabase.tables.insert("mai", "imagen_usage", usage_rows(2500), "id", False)
    run = run_main("usage", "--json", extra_env=supabase.env)
    assert run.code == 0, run
    report = json.loads(run.out)
    assert report["source"] == "Supabase mai.imagen_usage"
    assert sum(g["count"] for g in report["groups"]) == 2500
    total = sum(g["cost_usd"] for g in report["groups"])
    assert abs(total - (1250 * 0.025 + 1250 * 0.003)) < 1e-6
    gets = [r for r in supabase.requests if r.method == "GET"]
    assert [(r.query["offset"], r.query["limit"]) for r in gets] == [
        (["0"], ["1000"]), (["1000"], ["1000"]), (["2000"], ["1000"])]
    assert all(r.headers["accept-profile"] == "mai" for r in gets)
    assert gets[0].query["order"] == ["created_at.asc,id.asc"]


def test_usage_counts_every_row_under_a_max_rows_cap_below_1000(run_main, http_fake):
    from conftest import FakeSupabase
    fake = FakeSupabase(http_fake, max_rows=5)       # a project with db-max-rows = 5
    fake.tables.insert("mai", "imagen_usage", usage_rows(12), "id", False)
    report = json.loads(run_main("usage", "--json", extra_env=fake.env).out)
    assert sum(g["count"] for g in report["groups"]) == 12
    assert abs(sum(g["cost_usd"] for g in report["groups"]) - (6 * 0.025 + 6 * 0.003)) < 1e-6
    # 5, 5, then 2: a page shorter than an earlier one is the last, no empty page needed
    assert [r.query["offset"] for r in fake.requests] == [["0"], ["5"], ["10"]]
    fake.tables.insert("mai", "imagen_usage", usage_rows(15)[12:], "id", False)
    raw = json.loads(run_main("usage", "--raw", "--json", extra_env=fake.env).out)
    assert sorted(row["id"] for row in raw["rows"]) == [r["id"] for r in usage_rows(15)]


def test_fake_postgrest_caps_pages_and_counts_like_postgrest(http_fake):
    from conftest import FakeSupabase
    fake = FakeSupabase(http_fake, max_rows=5)
    fake.tables.insert("mai", "imagen_usage", usage_rows(12), "id", False)
    client = imagen.HttpClient()

    def get(offset, count=False):
        headers = {"apikey": fake.key, "Authorization": "Bearer " + fake.key,
                   "Accept-Profile": "mai"}
        if count:
            headers["Prefer"] = "count=exact"
        response = client.request("GET", "%s/rest/v1/imagen_usage?select=id&order=id.asc"
                                  "&limit=1000&offset=%d" % (fake.url, offset), headers=headers)
        return response.status, response.header("content-range"), len(response.json() or [])
    try:
        assert get(0) == (200, "0-4/*", 5)
        assert get(10) == (200, "10-11/*", 2)
        assert get(12) == (200, "*/*", 0)
        assert get(0, count=True) == (206, "0-4/12", 5)
        assert get(12, count=True) == (206, "*/12", 0)
        status, content_range, _ = get(13, count=True)
        assert (status, content_range) == (416, "*/12")
    finally:
        client.close()


def test_usage_from_a_hanging_postgrest_fails_within_the_timeout(run_main, supabase,
                                                                 write_config, fake_clock, asked):
    # each hang is silent past any deadline on the test's clock (a Stall), and the test
    # asserts that the read had one deadline of the 0.5 s timeout
    supabase.script("GET", "/rest/v1/imagen_usage", HANG, HANG, HANG, HANG, HANG)
    run = run_main("--config", write_config("cloud:\n  timeout: 0.5\n"), "usage",
                   extra_env=supabase.env)
    assert run.code == 1 and run.err == "imagen: usage: read mai.imagen_usage: timed out\n"
    assert_one_deadline(asked, 0.5)


def test_usage_groups_by_iso_week_backend_model_and_caller():
    rows = [{"created_at": "2025-12-29T10:00:00+00:00", "backend": "b", "model": "m",
             "caller": "c", "cost_usd": 0.5, "latency_ms": 100},
            {"created_at": "2026-01-01T01:00:00+02:00", "backend": "b", "model": "m",
             "caller": "c", "cost_usd": None, "latency_ms": 300},
            {"created_at": "2025-12-28T23:30:00-01:00", "backend": "b", "model": "m",
             "caller": "c", "cost_usd": 0.25, "latency_ms": None}]
    assert imagen.group_usage(rows) == [
        {"week": "2026-W01", "backend": "b", "model": "m", "caller": "c", "count": 3,
         "cost_usd": 0.75, "mean_latency_ms": 200}]


def test_usage_without_credentials_reads_the_ledger(run_main, env, write_config):
    for caller in ("ann", "ann", "bob"):
        run_main("generate", "x", "-o", "%s.png" % caller, extra_env={"MAI_FROM_ID": caller})
    run = run_main("usage")
    assert run.code == 0
    assert run.lines[0].split() == ["WEEK", "BACKEND", "MODEL", "CALLER", "COUNT", "COST_USD",
                                    "MEAN_MS"]
    body = [line.split() for line in run.lines[1:3]]
    assert [row[3:5] for row in body] == [["ann", "2"], ["bob", "1"]]
    assert run.lines[3].split()[:2] == ["total", "3"]
    assert "the ledger" in run.lines[-1]


def test_usage_local_flag_reads_the_ledger_even_with_credentials(run_main, supabase):
    run_main("generate", "x", "-o", "a.png")
    report = json.loads(run_main("usage", "--local", "--json", extra_env=supabase.env).out)
    assert report["source"].startswith("the ledger") and report["groups"][0]["count"] == 1
    assert supabase.requests == []


def test_usage_raw_is_one_row_per_generation(run_main, supabase):
    supabase.tables.insert("mai", "imagen_usage", usage_rows(3), "id", False)
    report = json.loads(run_main("usage", "--raw", "--json", extra_env=supabase.env).out)
    assert [row["id"] for row in report["rows"]] == [r["id"] for r in usage_rows(3)]
    run = run_main("usage", "--raw", extra_env=supabase.env)
    assert len(run.lines) == 5 and run.lines[1].startswith("2026-05-01T10:00:00+00:00")


def test_usage_since_filters_both_sources(run_main, supabase):
    supabase.tables.insert("mai", "imagen_usage", usage_rows(14), "id", False)
    report = json.loads(run_main("usage", "--since", "2026-05-10", "--raw", "--json",
                                 extra_env=supabase.env).out)
    assert len(report["rows"]) == 5
    assert [r for r in supabase.requests if r.method == "GET"][0].query["created_at"] == [
        "gte.2026-05-10"]
    run_main("generate", "x", "-o", "a.png")
    assert json.loads(run_main("usage", "--local", "--since", "2999-01-01", "--json").out)[
        "groups"] == []
    run = run_main("usage", "--since", "May 1")
    assert run.code == 2 and "--since must be a date YYYY-MM-DD" in run.err


# ----- into the real schema -----

def test_a_generate_syncs_into_the_real_schema_and_sync_finishes_a_partial(
        run_main, http_fake, supabase_db, owner, monkeypatch, write_config, env):
    """imagen's own rows, through the fake PostgREST, into a real PostgreSQL that has
    `imagen schema` applied: its types, constraints and RLS judge them."""
    from conftest import FakeSupabase
    monkeypatch.setitem(imagen.ADAPTERS, "paid-mock", PaidMock)
    fake = FakeSupabase(http_fake, tables=PostgresTables(supabase_db))
    path = cloud_config(write_config, owner=owner,
                        extra="backends:\n  paid:\n    adapter: paid-mock\n")
    fake.script("POST", "/rest/v1/images", (403, {}, {
        "code": "42501", "message": "permission denied for table images", "details": None,
        "hint": None}))
    run = run_main("--config", path, "generate", "a red fox", "--backend", "paid", "--seed",
                   str(2 ** 63 - 1), "-o", "fox.png", "--json", extra_env=fake.env)
    assert run.code == 0 and "imagen: cloud sync: uploaded" in run.err
    record = json.loads(run.out)
    [ledger] = ledger_rows(env)
    assert ledger["cloud"] == "partial" and ledger["seed"] == 2 ** 63 - 1
    run = run_main("--config", path, "sync", extra_env=fake.env)
    assert run.code == 0 and run.err == "", run
    mine = fake.tables.as_role("authenticated", {"sub": owner})
    [row] = mine.select("imagen", "images", None, [("id", "eq", ledger["id"])], [], 0, 10)[0]
    assert (row["seed"], row["owner_user_id"], row["tags"]) == (2 ** 63 - 1, owner, [])
    assert row["sidecar"] == {k: v for k, v in record.items() if k != "path"}
    usage = fake.tables.select("mai", "imagen_usage", None, [("id", "eq", ledger["id"])], [],
                               0, 10)[0]
    assert [(u["caller"], float(u["cost_usd"])) for u in usage] == [("tester", 0.003)]
    assert run_main("--config", path, "sync", extra_env=fake.env).lines == [
        "sync: nothing to do"]


def test_a_generate_row_is_accepted_as_sent_and_a_resent_insert_adds_nothing(
        run_main, http_fake, supabase_db, owner, monkeypatch, write_config):
    """The happy path into the real schema: the row `generate` itself sends (not one that
    `sync` rebuilds) with a prompt that needs escaping, the largest seed and a cost."""
    import datetime
    monkeypatch.setitem(imagen.ADAPTERS, "paid-mock", PaidMock)
    fake = FakeSupabase(http_fake, tables=PostgresTables(supabase_db))
    path = cloud_config(write_config, owner=owner,
                        extra="backends:\n  paid:\n    adapter: paid-mock\n")
    prompt = "l'été d'un \"renard\" ☃ \\ %s"
    run = run_main("--config", path, "generate", prompt, "--backend", "paid", "--size", "64x64",
                   "--seed", imagen.MAX_SEED, "-o", "fox.png", "--json", extra_env=fake.env)
    assert run.code == 0 and run.err == "", run
    record = json.loads(run.out)
    [row] = fake.tables.select("imagen", "images", None, [("owner_user_id", "eq", owner)], [],
                               0, 10)[0]
    assert (row["owner_user_id"], row["prompt"], row["seed"]) == (owner, prompt, imagen.MAX_SEED)
    assert row["storage_path"] in fake.objects() and row["cost_usd"] == 0.003
    assert (datetime.datetime.fromisoformat(row["created_at"])
            == datetime.datetime.fromisoformat(record["created_at"]))
    [insert] = inserts(fake)
    assert fake.handle(insert)[0] == 201           # the same request again, as a retry sends it
    assert supabase_db.value("select count(*) from imagen.images where owner_user_id = '%s'"
                             % owner) == "1"


# ----- secrets -----

def test_the_service_key_appears_in_no_output_ledger_or_file(run_main, supabase, write_config,
                                                            paid, env, tmp_path):
    path = cloud_config(write_config, extra="backends:\n  paid:\n    adapter: paid-mock\n")
    supabase.script("POST", "/rest/v1/images", (400, {}, {
        "code": "PGRST204", "message": "echo %s" % SERVICE_KEY, "details": None, "hint": None}))
    runs = [run_main("--config", path, "generate", "x", "--backend", "paid", "-o", "a.png",
                     "--json", extra_env=supabase.env),
            run_main("--config", path, "sync", extra_env=supabase.env),
            run_main("--config", path, "url", "a.png", extra_env=supabase.env),
            run_main("--config", path, "usage", extra_env=supabase.env),
            run_main("--config", path, "usage", "--raw", "--json", extra_env=supabase.env)]
    assert "[redacted]" in runs[0].err
    for run in runs:
        assert SERVICE_KEY not in run.out + run.err
    for file in tmp_path.rglob("*"):
        if file.is_file():
            assert SERVICE_KEY.encode() not in file.read_bytes(), file
# ===== Serve (HTTP API) =====
# Each test starts `imagen serve` as a subprocess on a free loopback port (conftest `serve`).

SLOW_BACKEND = """\
output:
  dir: %(out)s
backends:
  slow:
    adapter: mock
    gate: %(gate)s
    max_concurrency: %(limit)d
    max_queue: %(queue)d
  broken:
    adapter: mock
    fail: the model fell over
"""


def slow_config(tmp_path, limit=1, queue=1):
    """Its `slow` jobs run until release(tmp_path)."""
    return SLOW_BACKEND % {"out": tmp_path / "out", "gate": tmp_path / "gate", "limit": limit,
                           "queue": queue}


def release(tmp_path):
    (tmp_path / "gate").touch()


def in_background(function, *args, **kwargs):
    """Run function in a thread; the returned dict gets "result" (or "error") when done."""
    import threading
    box = {}

    def run():
        try:
            box["result"] = function(*args, **kwargs)
        except Exception as exc:
            box["error"] = exc
    box["thread"] = threading.Thread(target=run, daemon=True)
    box["thread"].start()
    return box


def finished(box, timeout=30):
    box["thread"].join(timeout)
    assert not box["thread"].is_alive(), "the request never finished"
    if "error" in box:
        raise box["error"]
    return box["result"]


def raw_exchange(port, data, timeout=10):
    """Send raw bytes on a fresh connection; return everything read until the server closes."""
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def test_serve_generate_answers_the_records_and_writes_image_and_sidecar(serve, tmp_path):
    server = serve()
    answer = server.generate(prompt="a red fox", size="64x96", seed=7, count=2)
    assert answer.status == 200, answer
    assert answer.headers["content-type"] == "application/json"
    images = answer.json()["images"]
    assert [image["seed"] for image in images] == [7, 8]
    for image in images:
        assert (image["width"], image["height"], image["prompt"]) == (64, 96, "a red fox")
        data = open(image["path"], "rb").read()
        assert imagen.sha256_hex(data) == image["sha256"]
        assert os.path.dirname(image["path"]).startswith(str(tmp_path / "out"))
        assert json.loads(open(image["path"] + ".json").read())["seed"] == image["seed"]
        served = server.request("GET", image["url"])
        assert served.status == 200 and served.body == data
        assert served.headers["content-type"] == "image/png"


def test_serve_takes_input_images_as_base64_and_checks_them(serve):
    import base64
    server = serve()
    a, b = imagen.mock_png("a", 1, 72, 64), solid_png(40, 30)
    encoded = [{"data": base64.b64encode(data).decode()} for data in (a, b)]
    answer = server.generate(prompt="a fox", seed=3, images=encoded, strength=0.5)
    assert answer.status == 200, answer
    record = answer.json()["images"][0]
    assert (record["width"], record["height"]) == (72, 64) and record["strength"] == 0.5
    assert [(i["path"], i["sha256"], i["bytes"]) for i in record["inputs"]] == [
        (None, imagen.sha256_hex(a), len(a)), (None, imagen.sha256_hex(b), len(b))]
    assert "id" not in record["inputs"][0]          # bytes without an imagen record
    bad = [({"images": [{"data": "!!"}]}, 400, "images[1].data is not base64"),
           ({"images": [{"data": base64.b64encode(b"GIF89a....").decode()}]}, 400,
            "images[1]: not a PNG, JPEG or WebP"),
           ({"images": ["x"]}, 400, "images must be a list of"),
           ({"images": encoded[:1] * 9}, 400, "at most 8 input images"),
           ({"strength": 0.5}, 400, "--strength goes with --image")]
    for fields, status, words in bad:
        answer = server.generate(prompt="a fox", size="64x64", **fields)
        assert answer.status == status and words in answer.json()["error"], (fields, answer)
    big = base64.b64encode(b"\x89PNG" + bytes(imagen.MAX_INPUT_BYTES)).decode()
    answer = server.generate(prompt="a fox", images=[{"data": big}])
    assert answer.status == 413 and "over the 20 MiB limit" in answer.json()["error"]


def test_serve_record_has_the_same_fields_as_generate_json(serve, run_main):
    record = serve().generate(prompt="a fox", size="64x64").json()["images"][0]
    cli_record = json.loads(run_main("generate", "a fox", "--size", "64x64", "--json", "-o",
                                     "f.png").out)
    assert set(record) == set(cli_record) | {"url"}


@pytest.mark.parametrize("fields, argv", [
    ({"prompt": "   "}, ["   "]),
    ({"prompt": "x", "size": "2x256"}, ["x", "--size", "2x256"]),
    ({"prompt": "x", "size": "big"}, ["x", "--size", "big"]),
    ({"prompt": "x", "steps": 500}, ["x", "--steps", "500"]),
    ({"prompt": "x", "seed": -1}, ["x", "--seed", "-1"]),
    ({"prompt": "x", "count": 101}, ["x", "--count", "101"]),
    ({"prompt": "x", "backend": "nope"}, ["x", "--backend", "nope"]),
    ({"prompt": "x", "style": "nope"}, ["x", "--style", "nope"]),
    ({"prompt": "x" * 20001}, ["x" * 20001]),
])
def test_serve_bad_input_is_400_with_the_cli_message(serve, run_main, tmp_path, fields, argv):
    server = serve("output:\n  dir: %s\n" % (tmp_path / "out"))
    answer = server.generate(**fields)
    cli = run_main("generate", *argv, "-o", tmp_path / "cli.png")
    assert answer.status == 400 and cli.code == 2
    assert "imagen: generate: %s\n" % answer.json()["error"] == cli.err   # the CLI names its command
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("body, message", [
    (b"{not json", "bad JSON"),
    (b"\xff\xfe", "bad JSON"),
    (b'["a fox"]', "must be a JSON object"),
    (b'{"seed": 3}', "prompt is missing"),
    (b'{"prompt": 5}', "prompt must be a string"),
    (b'{"prompt": "x", "size": 512}', "size must be a string"),
    (b'{"prompt": "x", "seed": "7"}', "seed must be a whole number"),
    (b'{"prompt": "x", "output": "/etc/passwd"}', "unknown field 'output'"),
    (b"[" * 60000, "nested too deeply"),
    (b'{"prompt": "x", "seed": ' + b"[" * 60000, "nested too deeply"),
])
def test_serve_malformed_body_is_400_with_a_json_error(serve, body, message):
    answer = serve().request("POST", "/v1/generate", body)
    assert answer.status == 400 and message in answer.json()["error"], answer


def test_serve_runs_the_post_steps_of_generate_but_never_the_preview(serve, supabase, env,
                                                                    tmp_path):
    server = serve('owner_user_id: "%s"\noutput:\n  dir: %s\ncloud:\n  timeout: 5\n'
                   % (OWNER_ID, tmp_path / "out"),
                   extra_env=dict(supabase.env, IMAGEN_PREVIEW="on"))   # on: exit 2 outside tmux
    answer = server.generate(prompt="a red fox", size="64x64")
    assert answer.status == 200, answer
    record = answer.json()["images"][0]
    [row] = ledger_rows(env)
    assert (row["path"], row["cloud"]) == (record["path"], "synced")
    assert len(uploads(supabase)) == 1 and len(inserts(supabase)) == 1


def test_serve_healthz_backends_and_unknown_routes(serve):
    server = serve()
    assert server.request("GET", "/healthz").json() == {"status": "ok",
                                                         "version": imagen.__version__}
    mock = server.backend("mock")
    assert (mock["adapter"], mock["default"], mock["usable"]) == ("mock", True, True)
    assert (mock["max_concurrency"], mock["max_queue"], mock["running"]) == (8, 32, 0)
    missing = server.request("GET", "/v2/generate")
    assert missing.status == 404 and "error" in missing.json()
    for method, path, allowed in [("GET", "/v1/generate", "POST"), ("DELETE", "/healthz", "GET"),
                                  ("POST", "/v1/images/a.png", "GET")]:
        answer = server.request(method, path)
        assert answer.status == 405 and answer.headers["allow"] == allowed, (method, path)
        assert "not allowed" in answer.json()["error"]
    unknown = server.request("BREW", "/healthz")
    assert unknown.status == 501 and unknown.headers["content-type"] == "application/json"
    for garbage in [b"NONSENSE\r\n\r\n", b"GET / HTTP/2.0\r\n\r\n", b"GET /" + b"x" * 70000]:
        reply = raw_exchange(server.port, garbage)
        assert reply.startswith(b"HTTP/1.1 4") or reply.startswith(b"HTTP/1.1 5"), reply[:80]
        assert b'\r\n\r\n{"error": ' in reply


def test_serve_keep_alive_requests_are_answered_without_waiting_for_a_delayed_ack(serve):
    """Headers and body sent in two writes made each keep-alive answer wait for the
    client's delayed ACK (Nagle): 40 ms a request, 0.8 s for these 20."""
    import time
    server = serve()
    conn = server.connect()

    def twenty_requests():
        started = time.monotonic()
        for _ in range(20):
            assert server.request("GET", "/healthz", conn=conn).status == 200
        return time.monotonic() - started
    fastest = twenty_requests()
    for _ in range(2):          # a busy machine gets two more tries
        if fastest < 0.4:
            break
        fastest = min(fastest, twenty_requests())
    assert fastest < 0.4


def test_serve_image_route_serves_files_under_output_dir_only(serve, tmp_path):
    out, outside = tmp_path / "out", tmp_path / "outside"
    (out / "day").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"secret")
    (tmp_path / "secret.png").write_bytes(b"secret")
    (out / "day" / "fox.png").write_bytes(b"fox png")
    (out / "day" / "fox.png.json").write_text("{}")
    (out / ".hidden.png").write_bytes(b"hidden")
    os.symlink(str(outside), str(out / "escape"))
    os.symlink(str(outside / "secret.png"), str(out / "day" / "link.png"))
    os.symlink(str(out / "day" / "fox.png"), str(out / "inside.png"))
    server = serve()
    for path, kind in [("day/fox.png", "image/png"), ("day/fox.png.json", "application/json"),
                       ("inside.png", "image/png"), ("day%2ffox.png", "image/png")]:
        answer = server.request("GET", "/v1/images/" + path)
        assert answer.status == 200 and answer.headers["content-type"] == kind, path
    for path in ["../secret.png", "day/../../secret.png", "%2e%2e/secret.png",
                 "%2E%2E%2Fsecret.png", "..%2fsecret.png", "day%2f..%2f..%2fsecret.png",
                 "%252e%252e/secret.png", "..%5csecret.png", "/secret.png", "escape/secret.png",
                 "day/link.png", ".hidden.png", "day", "day/", "", "day/fox.png%00.txt",
                 "%ff.png", "day/missing.png"]:
        answer = server.request("GET", "/v1/images/" + path)
        assert answer.status == 404 and answer.json() == {"error": "no such image"}, path


def test_serve_with_a_token_needs_the_bearer_header_on_every_request(serve_process):
    server = serve_process(token="s3cret-token")
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"},
                    {"Authorization": "Basic s3cret-token"}]:
        for method, path in [("GET", "/healthz"), ("GET", "/v1/backends"),
                             ("POST", "/v1/generate"), ("GET", "/v1/images/x.png")]:
            answer = server.request(method, path, headers=headers, auth=False)
            assert answer.status == 401, (headers, path)
            assert answer.headers["www-authenticate"].startswith("Bearer")
    assert server.request("GET", "/healthz", headers={"Authorization": "bearer s3cret-token"}
                          ).status == 200
    assert server.request("GET", "/healthz?token=s3cret-token").status == 200
    assert server.generate(prompt="x", size="64x64").status == 200
    assert server.stop() == 0
    assert "s3cret-token" not in server.log()


def test_serve_without_a_token_answers_without_a_header(serve):
    server = serve()
    assert server.request("GET", "/healthz", headers={"Authorization": "Bearer anything"}
                          ).status == 200


def test_serve_token_with_non_ascii_characters_is_accepted_as_utf8(serve_process):
    token = "jeton-café-ключ-à"      # à ends in \xa0: no blank to strip
    server = serve_process(token=token)     # the fixture sends the token's UTF-8 bytes
    assert server.generate(prompt="x", size="64x64").status == 200
    for sent in [b"Bearer jeton-caf\xe9-", ("Bearer " + token).encode("utf-8")[:-1]]:
        answer = server.request("GET", "/healthz", headers={"Authorization": sent})
        assert answer.status == 401, sent
    assert server.stop() == 0
    assert token not in server.log() and "jeton" not in server.log()


# What a web page the user visits can make the browser send to a loopback server: a POST
# with a body no CORS preflight guards (text/plain, a form), from its own origin, or to a
# name it controls that resolves to 127.0.0.1 (DNS rebinding).
def test_serve_refuses_what_a_web_page_may_send_and_generates_nothing(serve, tmp_path):
    server = serve()
    own, port = "127.0.0.1:%d" % server.port, server.port
    body = {"prompt": "a paid fox", "size": "64x64"}
    for path, headers, status in [
        ("/v1/generate", {"Content-Type": "text/plain"}, 415),
        ("/v1/generate", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ("/v1/generate", {"Content-Type": "multipart/form-data; boundary=x"}, 415),
        ("/v1/generate", {"Content-Type": None}, 415),
        ("/v1/generate", {"Origin": "http://evil.example"}, 403),
        ("/v1/generate", {"Origin": "null"}, 403),
        ("/v1/generate", {"Origin": "http://127.0.0.1:%d" % (port + 1)}, 403),
        ("/v1/generate", {"Origin": "http://localhost:%d" % port}, 403),   # Host is 127.0.0.1
        ("/v1/generate", {"Sec-Fetch-Site": "cross-site"}, 403),
        ("/v1/generate", {"Sec-Fetch-Site": "same-site"}, 403),
        ("/v1/generate", {"Host": "evil.example:%d" % port}, 403),
        ("/v1/generate", {"Host": "evil.example:%d" % port,
                          "Origin": "http://evil.example:%d" % port}, 403),   # rebinding
        ("/v1/generate", {"Host": "127.0.0.1:%d" % (port + 1)}, 403),
        ("/v1/backends", {"Host": "evil.example:%d" % port}, 403),
        ("/healthz", {"Origin": "http://evil.example"}, 403),
    ]:
        answer = server.request("POST" if path == "/v1/generate" else "GET", path,
                                body if path == "/v1/generate" else None, headers)
        assert answer.status == status, (headers, answer)
        assert answer.json()["error"], headers
    assert not (tmp_path / "out").exists()
    assert server.request("GET", "/healthz", headers={"Host": own}).status == 200


def test_serve_answers_scripts_its_own_pages_and_allowed_hosts(serve, tmp_path):
    server = serve("output:\n  dir: %s\nserve:\n  allowed_hosts: [imagen.lan]\n"
                   % (tmp_path / "out"))
    own, local = "127.0.0.1:%d" % server.port, "localhost:%d" % server.port
    for headers in [
        {},                                                       # a script: no Origin
        {"Origin": "http://" + own, "Sec-Fetch-Site": "same-origin"},   # its own page
        {"Host": local, "Origin": "http://" + local},
        {"Host": "imagen.lan:%d" % server.port, "Origin": "http://imagen.lan:%d" % server.port},
        {"Host": "Imagen.LAN", "Origin": "https://imagen.lan"},   # behind a TLS proxy
    ]:
        answer = server.request("POST", "/v1/generate", {"prompt": "x", "size": "64x64"},
                                headers)
        assert answer.status == 200, (headers, answer)
    typed = {"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate"}     # a typed URL
    assert server.request("GET", "/healthz", headers=typed).status == 200
    assert raw_exchange(server.port, b"GET /healthz HTTP/1.0\r\n\r\n").startswith(
        b"HTTP/1.1 200 ")                                         # no Host at all


def test_serve_allowed_hosts_config_key_is_checked():
    for good in [["imagen.lan", "x.test"], "imagen.lan", [], ["[fe80::1]", "10.0.0.7"]]:
        assert imagen.validate_config({"serve": {"allowed_hosts": good}}) == [], good
    for bad in [5, [5], "http://imagen.lan", "imagen.lan:8080", "imagen.lan/x", ""]:
        [(level, where, message, _)] = imagen.validate_config({"serve": {"allowed_hosts": bad}})
        assert (level, where) == ("error", "serve.allowed_hosts"), bad
        assert "host name" in message, bad
    [(level, where, message, _)] = imagen.validate_config({"serve": {"allowed_host": []}})
    assert (level, where) == ("warning", "serve.allowed_host") and "allowed_hosts" in message


def never_serves(monkeypatch):
    """For tests of a refused `imagen serve` run in-process: serving would block the test."""
    def serving(api, server):
        server.server_close()
        raise AssertionError("imagen serve started serving")
    monkeypatch.setattr(imagen, "serve_until_signalled", serving)


def test_serve_refuses_a_non_loopback_address_without_a_token(run_main, monkeypatch):
    never_serves(monkeypatch)
    run = run_main("serve", "--addr", ":%d" % free_port())
    assert run.code == 2 and "IMAGEN_SERVE_TOKEN" in run.err, run
    run = run_main("serve", "--addr", "192.0.2.1:8080")
    assert run.code == 2 and "not a loopback address" in run.err, run


@pytest.mark.parametrize("addr", ["8080", "host:port", "127.0.0.1:70000", "::1:8080"])
def test_serve_bad_addr_is_exit_2(run_main, monkeypatch, addr):
    never_serves(monkeypatch)
    run = run_main("serve", "--addr", addr)
    assert run.code == 2 and run.err.startswith("imagen: serve: --addr"), run


def test_serve_addr_forms_and_which_are_loopback():
    import socket
    assert imagen.parse_addr(":8080") == ("0.0.0.0", 8080, socket.AF_INET)
    assert imagen.parse_addr("[::1]:9") == ("::1", 9, socket.AF_INET6)
    assert imagen.parse_addr("localhost:0") == ("localhost", 0, socket.AF_INET)
    assert [imagen.is_loopback(h) for h in ("127.0.0.1", "127.3.4.5", "::1", "localhost")] \
        == [True] * 4
    assert [imagen.is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.org")] \
        == [False] * 4


def test_serve_port_in_use_is_exit_2(run_main, monkeypatch):
    import socket
    never_serves(monkeypatch)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        run = run_main("serve", "--addr", "127.0.0.1:%d" % busy.getsockname()[1])
    assert run.code == 2 and "cannot listen on" in run.err, run


def test_serve_refuses_a_body_over_64_kib_before_reading_it(serve):
    server = serve()
    head = ("POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json"
            "\r\nContent-Length: %d\r\n\r\n" % (server.port, imagen.SERVE_MAX_GENERATE_BODY + 1)).encode()
    reply = raw_exchange(server.port, head)      # no body sent: the answer must not wait for it
    assert reply.startswith(b"HTTP/1.1 413 ") and b'"error"' in reply
    big = {"prompt": "x" * (70 * 1024)}
    answer = server.request("POST", "/v1/generate", big)   # body sent in full: still readable
    assert answer.status == 413 and "at most 65536" in answer.json()["error"]
    assert server.request("POST", "/v1/generate", b"{}", {"Transfer-Encoding": "chunked"}
                          ).status == 411


def test_serve_expect_100_continue_gets_413_instead_of_continue(serve):
    server = serve()
    head = ("POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nExpect: 100-continue\r\n"
            "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (server.port, imagen.SERVE_MAX_GENERATE_BODY + 1)).encode()
    assert raw_exchange(server.port, head).startswith(b"HTTP/1.1 413 ")
    body = b'{"prompt": "a fox", "size": "64x64"}'
    head = ("POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nExpect: 100-continue\r\n"
            "Content-Type: application/json\r\nConnection: close\r\nContent-Length: %d"
            "\r\n\r\n" % (server.port, len(body))).encode()
    import socket
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head)
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        assert sock.recv(100).startswith(b"HTTP/1.1 200 ")


def test_serve_runs_at_most_max_concurrency_jobs_queues_the_next_and_refuses_past_it(serve, tmp_path):
    server = serve(slow_config(tmp_path, limit=2, queue=1))
    jobs = [in_background(server.generate, prompt="job %d" % i, size="64x64", backend="slow")
            for i in range(3)]
    poll(lambda: server.backend("slow")["waiting"] == 1, message="a job in the queue")
    assert server.backend("slow")["running"] == 2
    refused = server.generate(prompt="one too many", size="64x64", backend="slow")
    assert refused.status == 429 and refused.headers["retry-after"] == "1"
    assert "busy" in refused.json()["error"]
    assert server.generate(prompt="other backend", size="64x64").status == 200
    release(tmp_path)
    for job in jobs:
        answer = finished(job)
        assert answer.status == 200 and os.path.exists(answer.json()["images"][0]["path"])
    assert server.backend("slow")["running"] == 0


def test_serve_backend_failure_is_500_with_the_message_and_no_traceback(serve_process, tmp_path):
    server = serve_process(slow_config(tmp_path))
    answer = server.generate(prompt="x", size="64x64", backend="broken")
    assert answer.status == 500
    assert answer.json() == {"error": "broken: the model fell over"}
    assert server.stop() == 0
    assert "Traceback" not in server.log()


def test_serve_finishes_the_jobs_in_flight_on_sigterm_and_exits_0(serve_process, tmp_path):
    server = serve_process(slow_config(tmp_path, limit=1, queue=1))
    keep_alive = server.connect()
    assert server.request("GET", "/healthz", conn=keep_alive).status == 200
    running = in_background(server.generate, prompt="in flight", size="64x64", backend="slow")
    poll(lambda: server.backend("slow")["running"] == 1, message="a job running")
    queued = in_background(server.generate, prompt="queued", size="64x64", backend="slow")
    poll(lambda: server.backend("slow")["waiting"] == 1, message="a job queued")
    server.proc.send_signal(signal.SIGTERM)
    poll(lambda: refuses_connections(server), message="new connections to be refused")
    late = server.request("GET", "/healthz", conn=keep_alive)
    assert late.status == 503 and late.headers["connection"] == "close"
    assert running["thread"].is_alive() and queued["thread"].is_alive()
    release(tmp_path)
    for job in (running, queued):     # the queued request was accepted: it is finished too
        answer = finished(job)
        assert answer.status == 200
        assert os.path.exists(answer.json()["images"][0]["path"])
    assert server.proc.wait(30) == 0
    assert "stopped" in server.log()


def refuses_connections(server):
    try:
        server.request("GET", "/healthz")
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False      # it reached the backlog as the listener closed: try again
    return False


def test_serve_finishes_a_request_whose_body_is_still_arriving_on_sigterm(serve_process, tmp_path):
    import socket
    server = serve_process()
    body = json.dumps({"prompt": "late body", "size": "64x64"}).encode()
    head = ("POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: "
            "application/json\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
            % (server.port, len(body))).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head)
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n")   # headers are in
        server.proc.send_signal(signal.SIGTERM)
        poll(lambda: refuses_connections(server), message="new connections to be refused")
        sock.sendall(body)
        reply = b"".join(iter(lambda: sock.recv(65536), b""))    # until it closes
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]
    assert list((tmp_path / "out").rglob("late-body-*.png"))
    assert server.proc.wait(30) == 0


def test_serve_second_signal_stops_at_once_with_130(serve_process, tmp_path):
    server = serve_process(slow_config(tmp_path))       # never released
    stuck = in_background(server.generate, prompt="a long one", size="64x64", backend="slow")
    poll(lambda: server.backend("slow")["running"] == 1, message="a job running")
    server.proc.send_signal(signal.SIGTERM)
    poll(lambda: "stopping" in server.log(), message="the server to start stopping")
    assert server.stop(signal.SIGINT, timeout=10) == 130
    with pytest.raises(OSError):
        finished(stuck)


def post_in_process(env, body):
    """POST /v1/generate to a server run in this process (so a test can patch imagen);
    returns (status, JSON body)."""
    import http.client
    import socket
    import threading
    config = imagen.load_config(env=env)
    api = imagen.Api(config, env, "", 5.0, imagen.Console(quiet=True))
    server = imagen.make_server(api, "127.0.0.1", 0, socket.AF_INET)
    threading.Thread(target=server.serve_forever, args=(SHUTDOWN_POLL,), daemon=True).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        conn.request("POST", "/v1/generate", json.dumps(body),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        server.shutdown()
        server.server_close()


def test_serve_internal_error_is_500_without_details_or_traceback(env, capsys, monkeypatch):
    def bug(*args, **kwargs):
        raise KeyError("a bug's details")
    monkeypatch.setattr(imagen, "generate_images", bug)
    assert post_in_process(env, {"prompt": "x"}) == (500, {"error": "internal error"})
    err = capsys.readouterr().err
    assert "imagen: serve: internal error: KeyError" in err and "Traceback" not in err


def test_serve_failure_after_some_images_still_lists_them(env, monkeypatch):
    real = imagen.MockAdapter.generate

    def second_fails(adapter, request, deadline):
        if request.index == 1:
            raise imagen.ImagenError("mock: lost the second one")
        return real(adapter, request, deadline)
    monkeypatch.setattr(imagen.MockAdapter, "generate", second_fails)
    status, body = post_in_process(env, {"prompt": "x", "size": "64x64", "count": 3})
    assert status == 500 and body["error"] == "mock: lost the second one"
    [image] = body["images"]
    assert image["url"].startswith("/v1/images/") and os.path.isfile(image["path"])


def test_serve_access_log_keeps_one_line_whatever_the_path(serve_process):
    server = serve_process()
    reply = raw_exchange(server.port, b'GET /a"b\x1b[31m\xff HTTP/1.1\r\nConnection: close\r\n\r\n')
    assert reply.startswith(b"HTTP/1.1 404 ")
    assert server.stop() == 0
    assert '"GET /a%22b%1B[31m%FF" 404 ' in server.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_idle_exits_0_on_sigterm_and_sigint(serve_process, sig):
    assert serve_process().stop(sig) == 0


def test_serve_slow_clients_cost_a_thread_only_until_the_client_timeout(serve, fake_clock):
    import socket
    server = serve(None, "--client-timeout", "1")
    idle = server.connect()
    assert server.request("GET", "/healthz", conn=idle).status == 200
    # each sends a byte of the rest of its request every 0.2 s of the test's clock: a
    # slowloris, and a body that stalls (each byte also wakes the server's wait in the kernel)
    slow = {"slowloris": (b"GET /healthz HTTP/1.1\r\n", b"X-a: b\r\n" * 100),
            "stalled body": (b"POST /v1/generate HTTP/1.1\r\nContent-Length: 100"
                             b"\r\nContent-Type: application/json\r\n\r\n{", b" " * 100)}
    started = fake_clock.monotonic()
    socks = {name: socket.create_connection(("127.0.0.1", server.port), timeout=10)
             for name in slow}
    for name, (first, _) in slow.items():
        socks[name].sendall(first)
    assert server.request("GET", "/healthz").status == 200     # others are served meanwhile
    answered = {}       # name -> (seconds on the server's clock, of them moved on by us, sent)
    for step in range(1, 25):
        fake_clock.advance(0.2)
        for name in sorted(set(slow) - set(answered)):
            socks[name].sendall(slow[name][1][step - 1:step])
            # a glance before the timeout is over; after it, all the time a loaded CI needs
            socks[name].settimeout(0.02 if step * 0.2 < 1.0 else 10)
            try:
                data = socks[name].recv(65536)
                answered[name] = (fake_clock.monotonic() - started, step * 0.2, data)
            except socket.timeout:
                pass
        if len(answered) == len(slow):
            break
    for sock in socks.values():
        sock.close()
    # not before the client timeout on the server's clock (real time counts there too),
    # and within a few of our steps after it
    seconds, moved, sent = answered["slowloris"]
    assert 0.9 < seconds and moved < 5 and sent == b""
    seconds, moved, sent = answered["stalled body"]
    assert 0.9 < seconds and moved < 5 and sent.startswith(b"HTTP/1.1 408 ")
    idle.sock.sendall(b"G")          # wakes its wait in the kernel: idle for the whole timeout
    assert idle.sock.recv(1) == b"", "an idle keep-alive connection is closed by then"


def test_serve_survives_clients_that_drop_the_connection(serve_process, tmp_path):
    import socket
    server = serve_process(slow_config(tmp_path))
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/generate HTTP/1.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"pro")
    body = json.dumps({"prompt": "left behind", "size": "64x64", "backend": "slow"}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/generate HTTP/1.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        poll(lambda: server.backend("slow")["running"] == 1, message="the job to start")
    release(tmp_path)                             # its client is gone by now
    poll(lambda: list((tmp_path / "out").rglob("left-behind-*.png")), message="the job's image")
    assert server.request("GET", "/healthz").status == 200
    assert server.stop() == 0
    assert "Traceback" not in server.log()


def test_serve_logs_one_access_line_per_request_and_never_the_token(serve_process):
    server = serve_process(token="tok-123")
    server.request("GET", "/healthz?key=tok-123")
    server.generate(prompt="a fox", size="64x64")
    server.request("GET", "/nowhere", headers={"Authorization": "Bearer tok-123-wrong"})
    assert server.stop() == 0
    import re
    lines = [line for line in server.log().splitlines() if not line.startswith("imagen: ")]
    form = re.compile(r'127\.0\.0\.1 - \[[-0-9T:+]+\] "([A-Z]+ \S+)" (\d{3}) \d+ \d+ms$')
    assert all(form.match(line) for line in lines), lines
    # the fixture's readiness poll, then ours, in the order they finished
    assert sorted(form.match(line).groups() for line in lines) == [
        ("GET /healthz", "200"), ("GET /healthz", "200"), ("GET /nowhere", "401"),
        ("POST /v1/generate", "200")]
    assert "tok-123" not in server.log()


def test_ledger_created_by_two_connections_at_once_loses_no_row(tmp_path):
    """Found by the serve load bench: a burst of first generations on a new ledger."""
    import sqlite3
    import threading
    path = str(tmp_path / "ledger.db")
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")        # another process, in the middle of creating it
    release = threading.Timer(0.3, other.execute, ["COMMIT"])
    release.start()
    try:
        with imagen.Ledger(path) as ledger:
            ledger.add({"id": "1", "path": "a.png", "backend": "mock", "created_at": "now",
                        "record": "{}"})
            assert [row["path"] for row in ledger.rows()] == ["a.png"]
    finally:
        release.join()
        other.close()


def test_serve_max_queue_is_a_known_backend_key(run_main, write_config):
    good = write_config("backends:\n  m:\n    adapter: mock\n    max_queue: 0\n")
    assert run_main("--config", good, "config", "validate").code == 0
    bad = write_config("backends:\n  m:\n    adapter: mock\n    max_queue: -1\n", "bad.yaml")
    run = run_main("--config", bad, "config", "validate")
    assert run.code == 2 and "backends.m.max_queue" in run.err

# ----- the gallery's routes (SPEC §15); the page itself is tested in a real browser below -----

from urllib.parse import quote  # noqa: E402

from conftest import header_only_image  # noqa: E402


def gallery_images(env, tmp_path, prompts, size="64x64", **options):
    """Mock images made in-process into the `serve` fixture's output dir and ledger (start
    the server first: it writes the config); returns their records, oldest first."""
    records = []
    for prompt in prompts:
        records += imagen.generate(prompt, config=str(tmp_path / "serve.yaml"), env=env,
                                   size=size, preview="off", quiet=True, **options)
    return records


def test_serve_history_pages_newest_first_by_cursor_with_search_and_backend(serve, env, tmp_path):
    server = serve()
    made = gallery_images(env, tmp_path, ["a red fox", "a blue fox", "a red car", "a Red FOX too"])
    first = server.request("GET", "/v1/history?limit=3")
    assert first.status == 200 and first.headers["cache-control"] == "no-store"
    page = first.json()
    assert [row["prompt"] for row in page["rows"]] == ["a Red FOX too", "a red car", "a blue fox"]
    row = page["rows"][0]
    assert row["path"] == made[-1]["path"] and row["exists"] is True
    assert row["seed"] == str(made[-1]["seed"]) and (row["width"], row["height"]) == (64, 64)
    assert row["url"] == "/v1/images/" + os.path.relpath(made[-1]["path"], str(tmp_path / "out"))
    assert row["thumb"] == row["url"].replace("/v1/images/", "/v1/thumbs/")
    assert row["record"]["prompt"] == "a Red FOX too" and row["backend"] == "mock"
    rest = server.request("GET", "/v1/history?limit=3&before=" + quote(page["next"])).json()
    assert [row["prompt"] for row in rest["rows"]] == ["a red fox"] and rest["next"] is None
    found = server.request("GET", "/v1/history?q=" + quote("red fox")).json()["rows"]
    assert [row["prompt"] for row in found] == ["a Red FOX too", "a red fox"]
    assert server.request("GET", "/v1/history?backend=nope").json()["rows"] == []
    assert len(server.request("GET", "/v1/history?backend=mock").json()["rows"]) == 4
    by_id = server.request("GET", "/v1/history?id=" + row["id"]).json()["rows"]
    assert [r["prompt"] for r in by_id] == ["a Red FOX too"]
    for query in ("limit=0", "limit=201", "limit=x", "since=yesterday"):
        answer = server.request("GET", "/v1/history?" + query)
        assert answer.status == 400 and answer.json()["error"], query


def test_serve_history_search_folds_accents_and_case_and_needs_every_word(serve, env, tmp_path):
    server = serve()
    gallery_images(env, tmp_path, ["crème brûlée", "Crème fraîche on toast", "burnt sugar",
                                   "brulee only"])
    found = lambda q: [row["prompt"] for row in
                       server.request("GET", "/v1/history?q=" + quote(q)).json()["rows"]]
    assert found("creme") == ["Crème fraîche on toast", "crème brûlée"]
    assert found("CREME brulee") == ["crème brûlée"]
    assert found("brûlée") == ["brulee only", "crème brûlée"]
    assert found("creme sugar") == [] and found("fraiche toast crème") == ["Crème fraîche on toast"]


def test_serve_history_reads_through_one_ledger_connection_per_client_connection(
        serve, env, tmp_path, monkeypatch):
    server = serve()
    gallery_images(env, tmp_path, ["a fox"])
    opened, open_ledger = [], imagen.open_ledger
    monkeypatch.setattr(imagen, "open_ledger", lambda e: opened.append(1) or open_ledger(e))
    conn = server.connect()
    found = lambda q: [row["prompt"] for row in server.request(
        "GET", "/v1/history?q=" + quote(q), conn=conn).json()["rows"]]
    assert (found("fox"), found(""), found("owl")) == (["a fox"], ["a fox"], [])
    assert len(opened) == 1
    path = imagen.ledger_path(env)
    for name in (path, path + "-wal", path + "-shm"):       # the ledger deleted...
        if os.path.exists(name):
            os.unlink(name)
    assert found("") == []
    gallery_images(env, tmp_path, ["an owl"])               # ...and made anew
    assert found("") == ["an owl"] and len(opened) >= 2
    conn.close()


def test_serve_history_of_an_empty_ledger_is_an_empty_page(serve):
    assert serve().request("GET", "/v1/history").json() == {"rows": [], "next": None}


def test_serve_thumbs_downscale_pngs_to_at_most_w_wide_cached_by_sha256_and_w(serve, env, tmp_path):
    server = serve()
    wide, tall = gallery_images(env, tmp_path, ["wide"], size="320x200") + \
        gallery_images(env, tmp_path, ["tall"], size="100x400")
    url = "/v1/thumbs/" + os.path.relpath(wide["path"], str(tmp_path / "out"))
    answer = server.request("GET", url + "?w=100")
    assert answer.status == 200 and answer.headers["content-type"] == "image/png"
    assert png_size(answer.body) == (100, 62) or png_size(answer.body) == (100, 63)
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["cache-control"] == "private, no-cache"
    etag = answer.headers["etag"]
    assert etag == '"%s-100"' % wide["sha256"][:40]
    cached = tmp_path / "home" / ".cache" / "imagen" / "thumbs" / ("%s-100.png" % wide["sha256"])
    assert cached.read_bytes() == answer.body
    again = server.request("GET", url + "?w=100", headers={"If-None-Match": etag})
    assert again.status == 304 and again.body == b"" and again.headers["etag"] == etag
    assert "content-length" not in again.headers
    assert server.request("GET", url + "?w=101", headers={"If-None-Match": etag}).status == 200
    cached.write_bytes(b"served from the cache")        # the cache is read, not remade
    assert server.request("GET", url + "?w=100").body == b"served from the cache"
    tall_url = "/v1/thumbs/" + os.path.relpath(tall["path"], str(tmp_path / "out"))
    assert png_size(server.request("GET", tall_url + "?w=50").body) == (50, 200)
    narrow = server.request("GET", tall_url + "?w=1024")     # already narrower: the file
    assert narrow.body == open(tall["path"], "rb").read()
    assert png_size(server.request("GET", url).body)[0] == 256      # w defaults to 256
    for bad in ("?w=1025", "?w=0", "?w=-5", "?w=big"):
        answer = server.request("GET", url + bad)
        assert answer.status == 400 and "w must be a whole number from 1 to 1024" in answer.json()["error"]


def test_serve_thumbs_follow_the_path_rules_of_images(serve, env, tmp_path):
    server = serve()
    gallery_images(env, tmp_path, ["a fox"])
    (tmp_path / "secret.png").write_bytes(solid_png(8, 8))
    (tmp_path / "out" / ".hidden.png").write_bytes(solid_png(8, 8))
    os.symlink(str(tmp_path / "secret.png"), str(tmp_path / "out" / "link.png"))
    for path in ("../secret.png", "%2e%2e/secret.png", ".hidden.png", "link.png", "nope.png",
                 "", "a//b.png"):
        answer = server.request("GET", "/v1/thumbs/" + path + "?w=64")
        assert answer.status == 404, path
    assert not (tmp_path / "home" / ".cache" / "imagen").exists()


def test_serve_thumbs_of_jpeg_and_webp_are_the_files_themselves(serve, tmp_path):
    server = serve()
    (tmp_path / "out").mkdir()
    for name, fmt in (("a.jpg", "jpeg"), ("b.webp", "webp")):
        data = header_only_image(fmt, 640, 480)
        (tmp_path / "out" / name).write_bytes(data)
        answer = server.request("GET", "/v1/thumbs/%s?w=64" % name)
        assert answer.status == 200 and answer.body == data
        assert answer.headers["content-type"] == "image/" + fmt


def test_serve_usage_json_has_the_groups_of_imagen_usage_and_weekly_totals(serve, env, tmp_path,
                                                                        cli):
    server = serve()
    add_spend_rows(env)
    usage = server.request("GET", "/v1/usage")
    assert usage.status == 200
    body = usage.json()
    cli_json = json.loads(cli("usage", "--json").out)
    assert body["groups"] == cli_json["groups"] and body["source"] == cli_json["source"]
    assert body["weeks"] == [
        {"week": "2026-W20", "backends": {"flux-dev": 0.05, "flux-pro": 0.055}, "count": 3,
         "cost_usd": 0.105},
        {"week": "2026-W21", "backends": {"flux-dev": 0.025}, "count": 1, "cost_usd": 0.025}]
    assert body["total"] == {"count": 4, "cost_usd": 0.13}
    assert "0.1300" in cli("usage").out.splitlines()[-2]      # the same total as the CLI's
    assert server.request("GET", "/v1/usage?since=2026-05-15").json()["total"]["count"] == 1


def add_spend_rows(env):
    """Four paid generations over two ISO weeks and two backends, straight into the ledger."""
    rows = [("2026-05-11T10:00:00+00:00", "flux-dev", 0.025), ("2026-05-12T11:00:00+00:00",
            "flux-pro", 0.055), ("2026-05-13T12:00:00+00:00", "flux-dev", 0.025),
            ("2026-05-18T09:00:00+00:00", "flux-dev", 0.025)]
    with imagen.open_ledger(env) as ledger:
        for number, (stamp, backend, cost) in enumerate(rows):
            record = {"prompt": "paid %d" % number, "backend": backend, "seed": number}
            ledger.add({"id": "00000000-0000-4000-8000-%012d" % number,
                        "path": "/nowhere/paid-%d.png" % number, "backend": backend,
                        "model": "bfl/" + backend, "cost_usd": cost, "latency_ms": 1000,
                        "caller": "tester", "created_at": stamp, "record": json.dumps(record)})


def test_serve_gallery_page_is_one_small_html_page_with_a_strict_csp_and_no_cors(serve):
    import base64
    import hashlib
    server = serve()
    page = server.request("GET", "/", headers={"Origin": "http://127.0.0.1:%d" % server.port})
    assert page.status == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert len(page.body) <= 50 * 1024
    csp = page.headers["content-security-policy"]
    html = page.body.decode("utf-8")
    script = re.search(r"<script>(.*?)</script>", html, re.S).group(1)
    style = re.search(r"<style>(.*?)</style>", html, re.S).group(1)
    assert html.count("<script") == 1 and html.count("<style") == 1
    assert "src=\"http" not in html and "href=\"http" not in html and "@import" not in html
    for text, directive in ((script, "script-src"), (style, "style-src")):
        digest = base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode()
        assert "%s 'sha256-%s'" % (directive, digest) in csp
    assert csp.startswith("default-src 'self';") and "unsafe-inline" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert not [key for key in page.headers if key.startswith("access-control-")]
    icon = server.request("GET", "/favicon.ico")
    assert icon.status == 200 and icon.headers["content-type"] == "image/png"
    assert png_size(icon.body) == (32, 32)
    for path in ("/v1/history", "/v1/usage"):
        answer = server.request("GET", path)
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
    preflight = server.request("OPTIONS", "/v1/generate", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert preflight.status == 403 and "access-control-allow-origin" not in preflight.headers
    assert server.request("GET", "/nope").status == 404      # "/" is the page only


def test_serve_with_a_token_serves_the_page_and_icon_without_it_and_nothing_else(serve):
    server = serve(token="s3cret-token")
    assert b'data-token="required"' in server.request("GET", "/", auth=False).body
    assert server.request("GET", "/favicon.ico", auth=False).status == 200
    for path in ("/v1/history", "/v1/usage", "/v1/thumbs/a.png?w=8", "/v1/jobs/x"):
        assert server.request("GET", path, auth=False).status == 401, path
    assert server.request("GET", "/v1/history").status == 200


def test_serve_async_generate_answers_202_and_the_job_url_shows_progress_then_images(serve,
                                                                                    tmp_path):
    server = serve(slow_config(tmp_path, limit=1, queue=2))
    origin = {"Origin": "http://127.0.0.1:%d" % server.port, "Sec-Fetch-Site": "same-origin",
              "Prefer": "respond-async"}
    started = server.request("POST", "/v1/generate", {"prompt": "a fox", "backend": "slow",
                                                      "size": "64x64", "count": 2}, origin)
    assert started.status == 202, started
    job = started.json()
    assert started.headers["location"] == job["url"] == "/v1/jobs/" + job["id"]
    assert job["state"] in ("queued", "running") and job["count"] == 2 and job["images"] == []
    seen = set()

    def finished_job():
        state = server.request("GET", job["url"]).json()
        seen.add((state["state"], state["progress"]))
        return state if state["state"] in ("done", "failed") else None
    poll(lambda: finished_job() or ("running", "mock: working") in seen, timeout=20,
         message="the job to run")
    release(tmp_path)
    done = poll(finished_job, timeout=20, message="the job to finish")
    assert done["state"] == "done" and done["status"] == 200 and done["done"] == 2
    assert ("running", "mock: working") in seen
    assert len(done["images"]) == 2 and done["images"][0]["prompt"] == "a fox"
    assert server.request("GET", done["images"][0]["url"]).status == 200
    bad = server.request("POST", "/v1/generate", {"prompt": "x", "size": "big"}, origin)
    assert bad.status == 400 and "size" in bad.json()["error"]
    failing = server.request("POST", "/v1/generate", {"prompt": "x", "backend": "broken"}, origin)
    failed = poll(lambda: [state for state in [server.request("GET", failing.json()["url"]).json()]
                           if state["state"] == "failed"], timeout=20,
                  message="the broken job to fail")[0]
    assert failed["error"] == "broken: the model fell over" and failed["status"] == 500
    assert server.request("GET", "/v1/jobs/nope").status == 404
    assert server.request("POST", "/v1/jobs/x").status == 405


# ===== The browser harness (conftest `browser`, `page`): headless Chromium over CDP =====
# Self-tests of what the gallery's browser tests stand on, against a static page served
# by a loopback http.server.

from conftest import BrowserError, chromium_executable  # noqa: E402

HARNESS_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>harness</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<style>
  body { margin: 0; padding: 24px; background: #ffffff; color: #111111; font: 20px sans-serif; }
  @media (prefers-color-scheme: dark) { body { background: #101820; color: #f0f0f0; } }
  button, input { font: inherit; padding: 8px 16px; }
</style></head>
<body><h1>Browser harness</h1>
<button id="go">Press me</button> <input id="q" placeholder="search">
<p id="keys"></p>
<script>
console.log("the page script ran");
document.getElementById("go").addEventListener("click", (event) => {
  event.target.textContent = event.isTrusted ? "Clicked by a user" : "Clicked by a script";
});
document.addEventListener("keydown", (event) => {
  if (event.key === "/" && document.activeElement.id !== "q") {
    event.preventDefault();
    document.getElementById("q").focus();
  }
  document.getElementById("keys").textContent += event.key + " ";
});
</script></body></html>
"""


@pytest.fixture
def harness_site(http_fake):
    """The harness page at /, a 404 for anything else; returns the loopback server."""
    def handle(request):
        if request.path == "/":
            return 200, {"Content-Type": "text/html; charset=utf-8"}, HARNESS_PAGE
        return 404, {"Content-Type": "text/plain"}, "not here"
    return http_fake(handle)


def test_browser_loads_a_page_and_clicks_types_and_presses_keys_as_a_user(page, harness_site):
    page.goto(harness_site.url + "/")
    assert page.evaluate("document.title") == "harness"
    assert page.evaluate("Promise.resolve(6 * 7)") == 42          # promises are awaited
    page.click("#go")
    assert page.wait_for("document.getElementById('go').textContent") == "Clicked by a user"
    page.press("/")                                             # the page focuses its search
    assert page.evaluate("document.activeElement.id") == "q"
    page.type("#q", "red fox")
    page.type("#q", " é")
    assert page.evaluate("document.getElementById('q').value") == "red fox é"
    for key in ("Escape", "ArrowRight", "ArrowLeft"):
        page.press(key)
    assert page.evaluate("document.getElementById('keys').textContent") == \
        "/ Escape ArrowRight ArrowLeft "
    with pytest.raises(BrowserError, match="no element matches #missing"):
        page.click("#missing")
    with pytest.raises(BrowserError, match="ReferenceError: nothing is not defined"):
        page.evaluate("nothing.here")
    with pytest.raises(AssertionError, match="timed out after 0.1s"):
        page.wait_for("document.title === 'never'", timeout=0.1)
    assert page.console_errors == []
    assert page.requests == [harness_site.url + "/"] and page.foreign_requests() == []


def test_browser_pages_of_one_session_share_no_cookies_or_storage(browser, harness_site):
    first = browser.new_page()
    try:
        first.goto(harness_site.url + "/")
        first.evaluate("localStorage.setItem('k', 'v'); sessionStorage.setItem('k', 'v'); "
                       "document.cookie = 'k=v; max-age=600'")
        assert first.evaluate("document.cookie") == "k=v"
    finally:
        browser.close_page(first)
    second = browser.new_page()
    try:
        second.goto(harness_site.url + "/")
        assert second.evaluate("[localStorage.getItem('k'), sessionStorage.getItem('k'), "
                               "document.cookie]") == [None, None, ""]
    finally:
        browser.close_page(second)


def test_browser_clicks_out_of_view_accepts_dialogs_and_lets_a_page_use_the_clipboard(
        page, harness_site):
    page.goto(harness_site.url + "/")
    page.evaluate("""document.documentElement.style.scrollBehavior = 'smooth';
        document.body.insertAdjacentHTML('beforeend',
          '<button id="copy" style="position: absolute; top: 4000px">Copy</button>');
        document.getElementById('copy').onclick =
          () => navigator.clipboard.writeText('/out/fox.png')""")
    page.click("#copy")                 # scrolled into view at once, smooth or not
    assert page.wait_for("navigator.clipboard.readText()") == "/out/fox.png"
    assert page.evaluate("confirm('Delete?')") is True
    assert page.dialogs == ["Delete?"]
    assert page.console_errors == []


def test_browser_screenshot_is_a_png_of_the_viewport_in_the_emulated_scheme(page, harness_site,
                                                                           tmp_path):
    page.set_viewport(480, 320)
    page.goto(harness_site.url + "/")
    shots = {}
    for scheme in ("light", "dark"):
        page.emulate_color_scheme(scheme)
        path = page.screenshot(tmp_path / ("%s.png" % scheme))
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
        assert struct.unpack(">II", data[16:24]) == (480, 320)
        shots[scheme] = data
    assert shots["light"] != shots["dark"]


def test_browser_emulates_a_phone_width_and_both_color_schemes(page, harness_site):
    page.goto(harness_site.url + "/")
    page.set_viewport(375, 667, mobile=True)
    assert page.evaluate("[innerWidth, innerHeight]") == [375, 667]
    background = "getComputedStyle(document.body).backgroundColor"
    page.emulate_color_scheme("dark")
    assert page.evaluate("matchMedia('(prefers-color-scheme: dark)').matches") is True
    assert page.evaluate(background) == "rgb(16, 24, 32)"
    page.emulate_color_scheme("light")
    assert page.evaluate("matchMedia('(prefers-color-scheme: light)').matches") is True
    assert page.evaluate(background) == "rgb(255, 255, 255)"
    page.set_viewport(1024, 768)
    assert page.evaluate("innerWidth") == 1024


def test_browser_records_console_errors_uncaught_exceptions_and_failed_loads(page, harness_site):
    page.goto(harness_site.url + "/")
    page.evaluate("console.log('fine'); console.warn('only a warning'); console.error('boom', 42)")
    page.evaluate("setTimeout(() => { throw new TypeError('uncaught here') }, 0)")
    page.evaluate("new Promise((done) => { const img = new Image(); img.onerror = done;"
                  " img.src = '/missing.png'; document.body.append(img); })")
    page.wait_until(lambda: len(page.console_errors) >= 3, message="three console errors")
    errors = page.console_errors
    assert errors[0] == "console: boom 42"
    assert errors[1].startswith("exception: TypeError: uncaught here")
    assert errors[2].startswith("network: Failed to load resource: the server responded "
                                "with a status of 404") and "/missing.png" in errors[2]
    assert len(errors) == 3


def test_browser_reaches_no_host_but_127_0_0_1_and_records_every_request(page, harness_site):
    import socket
    # a listener on another loopback address: any connection the block let through lands here
    other = socket.socket()
    other.bind(("127.0.0.2", 0))
    other.listen(8)
    other.setblocking(False)
    elsewhere = ["http://127.0.0.2:%d/x" % other.getsockname()[1],
                 "http://localhost:%d/x" % harness_site.port,
                 "http://example.com/", "https://203.0.113.9/", "http://169.254.169.254/latest"]
    try:
        page.goto(harness_site.url + "/")
        outcomes = page.evaluate("Promise.all(%s.map((url) => fetch(url, {mode: 'no-cors'})"
                                 ".then(() => 'reached', () => 'failed')))" % json.dumps(elsewhere))
        assert outcomes == ["failed"] * len(elsewhere)
        assert page.evaluate("fetch('/').then((r) => r.status)") == 200
        with pytest.raises(BrowserError, match=r"goto http://example\.com/: net::ERR_"):
            page.goto("http://example.com/")
        with pytest.raises(BlockingIOError):
            other.accept()                  # nothing ever connected to 127.0.0.2
    finally:
        other.close()
    assert page.requests.count(harness_site.url + "/") == 2     # the page, then its fetch
    # the navigation tried https:// first (Chromium's HTTPS upgrade), then http://
    assert set(page.foreign_requests()) == set(elsewhere) | {"https://example.com/"}
    # refused by the dead proxy, whether or not this machine has a way out
    assert all(page.failed[url] == "net::ERR_PROXY_CONNECTION_FAILED" for url in elsewhere)


def test_browser_fixture_skips_naming_the_debian_package_outside_ci_and_fails_under_it(
        monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="Debian package chromium"):
        chromium_executable()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="Debian package chromium"):
        chromium_executable()


# ===== The gallery (serve GET /) in a real browser =====
# `imagen serve` as a subprocess with the mock backend, the page in headless Chromium.

TILES = "Array.from(document.querySelectorAll('#grid .tile .cap')).map((e) => e.textContent)"
def tiles_are(captions):
    """JavaScript: whether the grid's captions are these, in this order."""
    return "JSON.stringify(%s) === %s" % (TILES, json.dumps(json.dumps(captions, separators=(",", ":"))))


# the thumbnails in view: those further down load lazily, as the page is scrolled to them
THUMBS_LOADED = ("Array.from(document.querySelectorAll('#grid .tile img')).filter((img) => "
                 "img.getBoundingClientRect().top < innerHeight).every("
                 "(img) => img.complete && img.naturalWidth > 0)")


@pytest.fixture
def gallery(serve, env, tmp_path, page):
    """start(prompts=(), config_text=None, token=None) -> server, with the page opened on
    it and its first thumbnails shown."""
    def start(prompts=(), config_text=None, token=None, open_page=True):
        server = serve(config_text, token=token)
        gallery_images(env, tmp_path, prompts)
        server.url = "http://127.0.0.1:%d/" % server.port
        page.drive_timers()          # its refresh waits for fire_timers(); the rest runs 10x
        if open_page:
            page.goto(server.url)
            # past 50, the page may fetch the next one at once: its end is in view
            page.wait_for("document.querySelectorAll('#grid .tile').length >= %d"
                          % min(len(prompts), 50))
            page.wait_for(THUMBS_LOADED)
        return server
    return start


def test_gallery_grid_shows_thumbnails_newest_first_from_127_0_0_1_only(gallery, page):
    server = gallery(["a red fox", "a blue fox", "a green owl"])
    assert page.evaluate("document.title") == "imagen gallery"
    assert page.evaluate(TILES) == ["a green owl", "a blue fox", "a red fox"]
    sources = page.evaluate("Array.from(document.querySelectorAll('#grid img'),"
                            " (img) => img.getAttribute('src'))")
    assert all(re.match(r"/v1/thumbs/\d{4}-\d\d-\d\d/[^?]+\.png\?w=(256|512)$", src)
               for src in sources), sources
    assert page.evaluate("document.querySelector('#grid img').getAttribute('width')") == "64"
    assert page.evaluate("document.querySelectorAll('input[type=search]').length") == 1
    page.wait_until(lambda: server.url + "favicon.ico" in page.requests, message="the favicon")
    assert page.failed == {} and page.console_errors == [] and page.dialogs == []
    assert page.foreign_requests() == []
    assert any("/v1/history?" in url and "limit=50" in url for url in page.requests)


def test_gallery_search_box_keeps_the_images_with_every_word_and_slash_focuses_it(gallery, page):
    gallery(["a red fox", "a blue fox", "a red car", "fox, red and proud"])
    page.press("/")
    assert page.evaluate("document.activeElement.type") == "search"
    page.type("input[type=search]", "red fox")
    page.wait_for(tiles_are(["fox, red and proud", "a red fox"]))
    page.evaluate("document.getElementById('search').value = ''")
    page.type("input[type=search]", "car")
    page.wait_for(tiles_are(["a red car"]))
    page.evaluate("{ const s = document.getElementById('f-backend'); s.value = 'mock';"
                  " s.dispatchEvent(new Event('change')); }")
    page.wait_for(tiles_are(["a red car"]))
    assert page.console_errors == []


def test_gallery_detail_view_shows_the_record_with_copy_links_and_moves_with_arrows(gallery, page,
                                                                                  tmp_path):
    server = gallery(["first fox", "second fox", "third fox"])
    rows = server.request("GET", "/v1/history").json()["rows"]
    page.click("#grid .tile")
    page.wait_for("document.getElementById('detail').open")
    assert page.evaluate("document.getElementById('d-prompt').textContent") == "third fox"
    fields = page.evaluate("Object.fromEntries(Array.from(document.querySelectorAll('#d-fields dt'),"
                           " (dt) => [dt.textContent, dt.nextElementSibling.textContent]))")
    assert fields["seed"] == rows[0]["seed"] and fields["size"] == "64x64"
    assert fields["backend"] == "mock" and fields["model"] == "mock-gradient-1"
    assert fields["cost"] == "$0.0000" and fields["path"] == rows[0]["path"]
    assert fields["caller"] == rows[0]["record"]["caller"] and "time" in fields
    links = page.evaluate("Array.from(document.querySelectorAll('#d-links a'), (a) => a.getAttribute('href'))")
    assert links == [rows[0]["url"]]
    page.wait_for("document.querySelector('#d-figure img').naturalWidth === 64")
    assert page.evaluate("document.querySelector('#d-figure img').getAttribute('src')") == rows[0]["url"]
    assert page.evaluate("JSON.parse(document.getElementById('d-record').textContent).prompt") == "third fox"
    page.click("#d-copy")
    assert page.evaluate("document.getElementById('d-copy').textContent") == "copy"
    assert page.wait_for("navigator.clipboard.readText()") == "third fox"
    page.click("#d-copy-path")
    page.wait_for("navigator.clipboard.readText().then((t) => t === %s)" % json.dumps(rows[0]["path"]))
    assert page.evaluate("document.getElementById('d-download').getAttribute('href')") == rows[0]["url"]
    page.press("ArrowRight")
    page.wait_for("document.getElementById('d-prompt').textContent === 'second fox'")
    page.press("ArrowRight")
    page.wait_for("document.getElementById('d-prompt').textContent === 'first fox'")
    page.press("ArrowLeft")
    page.wait_for("document.getElementById('d-prompt').textContent === 'second fox'")
    page.press("Escape")
    page.wait_for("!document.getElementById('detail').open")
    page.click("#grid li:nth-child(2) .tile")
    page.click("#d-remix")                  # the form, filled from the record
    page.wait_for("document.getElementById('gen').open")
    form = page.evaluate("Object.fromEntries(new FormData(document.getElementById('gen-form')))")
    assert form["prompt"] == "second fox" and form["seed"] == rows[1]["seed"]
    assert form["size"] == "64x64" and form["backend"] == "mock"
    assert page.console_errors == []


def test_gallery_shows_a_prompt_of_html_as_text_and_runs_none_of_it(gallery, page):
    evil = "<img src=x onerror=alert(1)><script>alert(2)</script>"
    gallery([evil])
    assert page.evaluate(TILES) == [evil]
    page.click("#grid .tile")
    page.wait_for("document.getElementById('detail').open")
    assert page.evaluate("document.getElementById('d-prompt').textContent") == evil
    assert page.evaluate("document.querySelectorAll('img[src=x], script').length") == 1  # ours
    assert page.dialogs == [] and page.console_errors == []
    assert not [url for url in page.requests if url.endswith("/x")]


def test_gallery_shows_an_image_made_by_another_process_within_5_seconds(gallery, page, cli,
                                                                        tmp_path):
    gallery(["already here"])
    made = cli("--config", tmp_path / "serve.yaml", "generate", "from another process",
               "--size", "64x64")
    assert made.code == 0, made
    # on the page's clock: its next look comes within 5 s, and that one look shows it
    [delay] = page.timer_delays(held=True)
    assert 0 < delay <= 5000 and page.fire_timers() == 1
    page.wait_for("document.querySelector('#grid .tile .cap').textContent"
                  " === 'from another process'")
    assert page.timer_delays(held=True) == [delay]          # and it keeps looking
    assert page.evaluate(TILES) == ["from another process", "already here"]
    page.wait_for(THUMBS_LOADED)
    assert page.console_errors == []


def test_gallery_generate_form_shows_progress_then_the_new_image_and_errors_as_imagen(gallery,
                                                                                    page, tmp_path):
    gallery(["an old fox"], config_text=slow_config(tmp_path, limit=1, queue=2))
    page.click("#to-generate")
    page.wait_for("document.getElementById('gen').open")
    assert page.evaluate("Array.from(document.getElementById('gen-form').elements,"
                         " (e) => e.name).filter(Boolean)") == [
        "prompt", "backend", "size", "seed", "style", "count", "images", "strength"]
    assert page.evaluate("document.querySelectorAll('#gen-form [type=submit]').length") == 1
    page.type("textarea[name=prompt]", "a brand new fox")
    page.evaluate("{ const f = document.getElementById('gen-form'); f.elements.backend.value = 'slow';"
                  " f.elements.size.value = '64x64'; f.elements.seed.value = '9007199254740993'; }")
    page.click("#gen-form [type=submit]")
    status = page.wait_for("(t => /running on slow: 0 of 1 done/.test(t) && t)("
                           "document.getElementById('g-status').textContent)")
    assert "mock: working" in page.wait_for(
        "(t => t.includes('mock: working') && t)(document.getElementById('g-status').textContent)")
    assert page.evaluate("document.getElementById('g-progress').hidden") is False, status
    release(tmp_path)
    page.wait_for("document.querySelector('#g-result img') &&"
                  " document.querySelector('#g-result img').naturalWidth === 64")
    page.wait_for("document.querySelector('#grid .tile .cap').textContent === 'a brand new fox'")
    page.click("#g-close")
    page.click("#grid .tile")
    page.wait_for("document.getElementById('d-fields').textContent.includes('9007199254740993')")
    page.press("Escape")
    page.click("#to-generate")
    page.evaluate("document.getElementById('gen-form').elements.size.value = 'big'")
    page.click("#gen-form [type=submit]")
    error = page.wait_for("document.getElementById('g-error').textContent")
    assert error.startswith("imagen: ") and "size" in error
    page.evaluate("{ const f = document.getElementById('gen-form'); f.elements.size.value = '';"
                  " f.elements.backend.value = 'broken'; }")
    page.click("#gen-form [type=submit]")
    page.wait_for("document.getElementById('g-error').textContent"
                  " === 'imagen: broken: the model fell over'")
    posts = [url for url in page.requests if url.endswith("/v1/generate")]
    assert len(posts) == 3 and any("/v1/jobs/" in url for url in page.requests)
    # the 400 of the bad size is the only failed request, as the browser logs it
    assert len(page.console_errors) == 1 and "400" in page.console_errors[0]


def test_gallery_generate_form_sends_chosen_images_and_edit_this_sends_the_image_shown(
        gallery, page, tmp_path):
    import hashlib
    server = gallery(["a fox to start from"])
    chosen = tmp_path / "chosen.png"
    chosen.write_bytes(solid_png(80, 72))
    page.click("#to-generate")
    page.wait_for("document.getElementById('gen').open")
    field = "#gen-form input[type=file][name=images]"
    assert page.evaluate("(f => [f.accept, f.multiple])(document.querySelector(%s))"
                         % json.dumps(field)) == ["image/png,image/jpeg,image/webp", True]
    page.type("textarea[name=prompt]", "from my file")
    page.choose_files(field, [chosen])
    page.evaluate("document.getElementById('gen-form').elements.strength.value = '0.6'")
    page.click("#gen-form [type=submit]")
    page.wait_for("(i => i && i.naturalWidth === 80)(document.querySelector('#g-result img'))")
    page.wait_for("document.querySelector('#grid .tile .cap').textContent === 'from my file'")
    made = server.request("GET", "/v1/history?limit=1").json()["rows"][0]
    [given] = made["record"]["inputs"]
    assert given["sha256"] == hashlib.sha256(chosen.read_bytes()).hexdigest()
    assert made["record"]["strength"] == 0.6 and (made["width"], made["height"]) == (80, 72)
    page.click("#g-close")
    page.click("#grid li:nth-child(2) .tile")           # "edit this" on the first image
    page.wait_for("document.getElementById('d-prompt').textContent === 'a fox to start from'")
    source = server.request("GET", "/v1/history?limit=1&before=" + quote(made["cursor"])
                            ).json()["rows"][0]
    page.click("#d-edit")
    page.wait_for("document.getElementById('gen').open")
    assert page.evaluate("document.getElementById('g-inputs').textContent").startswith(
        "input: " + os.path.basename(source["path"]))
    assert page.evaluate("document.querySelector(%s).files.length" % json.dumps(field)) == 0
    page.type("textarea[name=prompt]", "the fox, edited")
    page.click("#gen-form [type=submit]")
    page.wait_for("document.querySelector('#grid .tile .cap').textContent === 'the fox, edited'")
    edited = server.request("GET", "/v1/history?limit=1").json()["rows"][0]
    [given] = edited["record"]["inputs"]
    assert given["id"] == source["id"] and given["sha256"] == source["record"]["sha256"]
    page.click("#g-close")
    page.click("#grid .tile")                           # its inputs link to the source
    page.wait_for("document.getElementById('d-prompt').textContent === 'the fox, edited'")
    page.click("#d-links a[href='#%s']" % source["id"])
    page.wait_for("document.getElementById('d-prompt').textContent === 'a fox to start from'")
    page.press("Escape")
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image\n")
    page.click("#to-generate")
    assert page.evaluate("document.getElementById('g-inputs').textContent") == ""
    page.type("textarea[name=prompt]", "from a text file")
    page.choose_files(field, [notes])
    page.click("#gen-form [type=submit]")
    error = page.wait_for("document.getElementById('g-error').textContent")
    assert error.startswith("imagen: images[1]: not a PNG, JPEG or WebP image"), error
    assert page.evaluate(TILES)[0] == "the fox, edited"
    # the 400 of the text file is the only failed request, as the browser logs it
    assert len(page.console_errors) == 1 and "400" in page.console_errors[0]


def test_gallery_scrolls_through_60_images_in_pages_of_50(gallery, page):
    gallery(["fox %02d" % number for number in range(60)])
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    page.wait_for("document.querySelectorAll('#grid .tile').length === 60")
    tiles = page.evaluate(TILES)
    assert tiles == ["fox %02d" % number for number in reversed(range(60))]
    # whether the second page came with the scroll or before it (its end was 800 px below
    # the view), there were two, of 50 each
    pages = [url for url in page.requests if "/v1/history?" in url]
    assert len(pages) == 2 and all("limit=50" in url for url in pages), pages
    assert "before=" not in pages[0] and "before=" in pages[1]
    page.wait_for(THUMBS_LOADED)
    assert page.console_errors == []


def test_gallery_with_a_token_asks_once_keeps_it_for_the_tab_and_sends_it_as_bearer(gallery, page):
    token = "gallery-token-31337"
    server = gallery(["a secret fox", "another"], token=token, open_page=False)
    page.goto(server.url)
    page.wait_for("document.getElementById('token-dialog').open")
    assert page.evaluate("document.getElementById('token').type") == "password"
    page.type("#token", token)
    page.press("Enter")
    page.wait_for("document.querySelectorAll('#grid .tile').length === 2")
    page.wait_for(THUMBS_LOADED)
    sources = page.evaluate("Array.from(document.querySelectorAll('#grid img'), (i) => i.src)")
    assert all(src.startswith("blob:http://127.0.0.1:") for src in sources)
    assert page.evaluate("sessionStorage.getItem('imagen.token')") == token
    assert any("/v1/thumbs/" in url for url in page.requests)
    page.goto(server.url)                       # a reload does not ask again
    page.wait_for("document.querySelectorAll('#grid .tile').length === 2")
    assert page.evaluate("document.getElementById('token-dialog').open") is False
    page.click("#grid .tile")
    page.wait_for("(i => i && i.naturalWidth === 64 && i.src.startsWith('blob:'))("
                  "document.querySelector('#d-figure img'))")
    assert page.dialogs == [] and page.console_errors == []
    assert not [url for url in page.requests if token in url]
    assert "Authorization" not in server.log() and token not in server.log()


def test_gallery_spend_view_draws_weeks_by_backend_with_the_totals_of_imagen_usage(gallery, page,
                                                                                  env, cli):
    gallery(["a free fox"])
    add_spend_rows(env)
    page.click("#to-spend")
    page.wait_for("document.querySelectorAll('#chart svg rect').length >= 3")
    assert page.evaluate("document.getElementById('gallery').hidden") is True
    assert page.evaluate("getComputedStyle(document.getElementById('filters')).display") == "none"
    labels = page.evaluate("Array.from(document.querySelectorAll('#chart svg text'),"
                           " (t) => t.textContent)")
    for text in ("2026-W20", "2026-W21", "$0.1050", "$0.0250", "flux-dev", "flux-pro"):
        assert text in labels, text
    total_line = cli("usage").out.splitlines()[-2].split()
    assert page.evaluate("document.getElementById('spend-total').textContent") == total_line[-1]
    assert page.evaluate("document.getElementById('spend-count').textContent") == total_line[-2]
    rows = page.evaluate("document.querySelectorAll('#spend-table tbody tr').length")
    assert rows == len(json.loads(cli("usage", "--json").out)["groups"])
    assert page.console_errors == []


def test_gallery_fits_a_phone_in_dark_and_light_without_layout_shift(gallery, page):
    page.set_viewport(390, 844, mobile=True)
    page.evaluate("window.__shift = 0; new PerformanceObserver((list) => { for (const e of"
                  " list.getEntries()) window.__shift += e.value; }).observe({type: 'layout-shift',"
                  " buffered: true})")
    gallery(["fox %d" % number for number in range(12)])
    page.evaluate("window.__shift = 0; new PerformanceObserver((list) => { for (const e of"
                  " list.getEntries()) if (!e.hadRecentInput) window.__shift += e.value; })"
                  ".observe({type: 'layout-shift', buffered: true})")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert page.evaluate("getComputedStyle(document.getElementById('grid'))"
                         ".gridTemplateColumns.split(' ').length") >= 3
    page.emulate_color_scheme("dark")
    dark = page.evaluate("getComputedStyle(document.body).backgroundColor")
    page.emulate_color_scheme("light")
    light = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert dark == "rgb(18, 20, 23)" and light == "rgb(247, 247, 245)"
    assert page.evaluate("window.__shift") == 0
    assert page.console_errors == []


def test_gallery_screenshot_for_the_readme(gallery, page, tmp_path):
    """`make screenshot` keeps it as gallery.png next to the README."""
    page.set_viewport(1000, 640)
    page.emulate_color_scheme("dark")
    prompts = ["a red fox in the snow", "lighthouse at dusk", "a bowl of ramen", "city of glass",
               "an owl on a branch", "koi pond", "mountain lake", "paper cranes",
               "desert at noon", "a fox, watercolour", "neon alley", "tea garden"]
    gallery(prompts)
    path = page.screenshot(tmp_path / "gallery.png")
    data = path.read_bytes()
    assert struct.unpack(">II", data[16:24]) == (1000, 640)
    small = imagen.downscale_png(data, 600, level=9)     # small enough to commit
    assert png_size(small) == (600, 384)
    target = os.environ.get("IMAGEN_GALLERY_SCREENSHOT")
    if target:
        with open(target, "wb") as handle:
            handle.write(small)


# ===== MCP server (imagen mcp, stdio) =====

MCP_INIT = {"protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "test", "version": "1"}}
MODERN_META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
               "io.modelcontextprotocol/clientCapabilities": {}}


def rpc(ident, method, params=None):
    message = {"jsonrpc": "2.0", "id": ident, "method": method}
    if params is not None:
        message["params"] = params
    return message


def call_tool(ident, name, arguments=None, **meta):
    params = {"name": name, "arguments": arguments or {}}
    if meta:
        params["_meta"] = meta
    return rpc(ident, "tools/call", params)


def mcp_session(env, messages, config=None):
    """Serve `messages` (dicts, or raw lines as bytes) in this process until their end, as
    from a closed stdin; returns (exit code, messages written, stderr text)."""
    import io
    out, log = io.BytesIO(), io.StringIO()
    server = imagen.McpServer(config or imagen.load_config(env=env), env, out, log)
    data = b"".join(m if isinstance(m, bytes) else json.dumps(m).encode() + b"\n"
                    for m in messages)
    code = server.serve(io.BytesIO(data))
    lines = out.getvalue().splitlines()
    return code, [json.loads(line) for line in lines], log.getvalue()


def answers(messages):
    return {m["id"]: m for m in messages if "id" in m and "method" not in m}


def mcp_config(write_config, tmp_path, extra=""):
    path = write_config("output:\n  dir: %s\n%s" % (tmp_path / "out", extra))
    return imagen.load_config(str(path), {})


@pytest.mark.parametrize("asked,answered", [
    ("2025-03-26", "2025-03-26"), ("2025-06-18", "2025-06-18"), ("2025-11-25", "2025-11-25"),
    ("2024-11-05", "2025-11-25"), ("2099-01-01", "2025-11-25"), (None, "2025-11-25")])
def test_mcp_initialize_echoes_a_supported_version_else_answers_its_newest(env, asked, answered):
    _, out, _ = mcp_session(env, [rpc(1, "initialize", dict(MCP_INIT, protocolVersion=asked))])
    result = out[0]["result"]
    assert out[0]["id"] == 1 and result["protocolVersion"] == answered
    assert result["capabilities"] == {"tools": {"listChanged": False}}
    assert result["serverInfo"] == {"name": "imagen", "version": imagen.version_string()}
    assert "list_backends" in result["instructions"]


def test_mcp_answers_requests_before_initialize_and_ignores_notifications(env):
    code, out, _ = mcp_session(env, [
        rpc(1, "ping"), rpc(2, "tools/list"),
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "method": "notifications/something_new", "params": {"x": 1}},
        {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 99}},
        {"jsonrpc": "2.0", "id": 5, "result": {}},          # an answer to nothing: ignored
        rpc(3, "ping")])
    assert code == 0
    assert [m["id"] for m in out] == [1, 2, 3]
    assert out[0]["result"] == {} and "tools" in out[1]["result"]


@pytest.mark.parametrize("message,code,ident", [
    ({"id": 1, "method": "ping"}, -32600, 1),                        # no "jsonrpc": "2.0"
    ({"jsonrpc": "1.0", "id": 1, "method": "ping"}, -32600, 1),
    ({"jsonrpc": "2.0", "id": 1}, -32600, 1),                        # no method
    ({"jsonrpc": "2.0", "id": 1, "method": 7}, -32600, 1),
    ({"jsonrpc": "2.0", "id": None, "method": "ping"}, -32600, None),
    ({"jsonrpc": "2.0", "id": True, "method": "ping"}, -32600, None),
    ({"jsonrpc": "2.0", "id": 1.5, "method": "ping"}, -32600, None),
    ([{"jsonrpc": "2.0", "id": 1, "method": "ping"}], -32600, None),  # a batch
    ("ping", -32600, None),
    ({"jsonrpc": "2.0", "id": "a", "method": "ping", "params": [1]}, -32602, "a"),
    ({"jsonrpc": "2.0", "id": 2, "method": "resources/list"}, -32601, 2),
    ({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "nope"}}, -32602, 3),
    ({"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {}}, -32602, 4),
])
def test_mcp_invalid_requests_get_json_rpc_errors(env, message, code, ident):
    _, out, _ = mcp_session(env, [json.dumps(message).encode() + b"\n", rpc(9, "ping")])
    assert out[0]["error"]["code"] == code and out[0]["id"] == ident
    assert out[0]["jsonrpc"] == "2.0" and isinstance(out[0]["error"]["message"], str)
    assert out[1] == {"jsonrpc": "2.0", "id": 9, "result": {}}      # and it goes on


def test_mcp_a_request_id_in_use_by_a_running_call_is_refused(env, write_config, tmp_path):
    piped = PipedMcp(imagen.load_config(str(write_config(slow_config(tmp_path))), {}), env)
    slow = {"prompt": "x", "size": "64x64", "backend": "slow"}     # runs until release()
    piped.send(call_tool(7, "generate_image", slow))
    piped.send(call_tool(7, "generate_image", slow))
    piped.send(rpc(8, "tools/call", {"name": "list_backends", "arguments": [1]}))
    poll(lambda: 8 in answers(piped.messages()), message="the answer to 8")
    release(tmp_path)
    piped.close()
    out = piped.messages()
    sevens = [m for m in out if m.get("id") == 7]
    assert sevens[0]["error"]["code"] == -32600 and "result" in sevens[1]
    eight = answers(out)[8]["result"]
    assert eight["isError"] and eight["content"][0]["text"] == "imagen: arguments must be an object"


def test_mcp_unknown_tool_names_the_known_ones(env):
    _, out, _ = mcp_session(env, [call_tool(1, "draw")])
    assert out[0]["error"] == {"code": -32602, "message":
                               "unknown tool 'draw' (known: generate_image, edit_image, "
                               "search_images, list_backends)"}


def test_mcp_tools_list_has_precise_schemas_from_the_config(env, write_config, tmp_path):
    config = mcp_config(write_config, tmp_path, "default_backend: fast\nbackends:\n"
                        "  fast:\n    adapter: mock\n  other:\n    adapter: mock\n"
                        "  paid:\n    adapter: replicate\n    model: black-forest-labs/flux-schnell\n"
                        "styles:\n  poster:\n    size: 768x1344\n  blog:\n    prompt: '{prompt}, flat'\n")
    _, out, _ = mcp_session(env, [rpc(1, "tools/list")], config)
    tools = {tool["name"]: tool for tool in out[0]["result"]["tools"]}
    assert list(tools) == ["generate_image", "edit_image", "search_images", "list_backends"]
    generate = tools["generate_image"]
    schema = generate["inputSchema"]
    assert schema["type"] == "object" and schema["required"] == ["prompt"]
    assert schema["additionalProperties"] is False
    props = schema["properties"]
    assert props["backend"]["enum"] == ["fast", "mock", "other", "paid"]
    assert props["style"]["enum"] == ["blog", "poster"]
    assert (props["seed"]["type"], props["seed"]["minimum"], props["seed"]["maximum"]) == \
        ("integer", 0, 2 ** 63 - 1)
    assert (props["steps"]["minimum"], props["steps"]["maximum"]) == (0, 200)
    assert (props["count"]["minimum"], props["count"]["maximum"]) == (1, 100)
    assert props["prompt"]["maxLength"] == 20000
    size = re.compile(props["size"]["pattern"])
    for good in ("64x64", "1024x1024", "4096x4096", "1344x768", "4090x99"):
        assert size.match(good), good
    for bad in ("63x64", "4097x64", "1024", "1024x1024x1", "0064x64", "1e3x64", "1024X1024 "):
        assert not size.match(bad), bad
    assert props["images"] == dict(props["images"], type="array", maxItems=8,
                                   items={"type": "string", "minLength": 1})
    assert props["strength"] == dict(props["strength"], type="number", exclusiveMinimum=0,
                                     maximum=1)
    assert "- fast (the default): mock" in generate["description"]
    assert re.search(r"- paid: replicate, .*per image.*; not usable: \$REPLICATE_API_TOKEN is not set",
                     generate["description"])
    assert "- poster: size 768x1344" in generate["description"]
    assert generate["outputSchema"]["required"] == ["images"]
    assert generate["annotations"]["readOnlyHint"] is False
    assert tools["list_backends"]["inputSchema"]["properties"] == {}
    assert tools["list_backends"]["annotations"]["readOnlyHint"] is True


def test_mcp_edit_and_search_schemas_are_precise(env, write_config, tmp_path):
    config = mcp_config(write_config, tmp_path, "default_edit_backend: editor\nbackends:\n"
                        "  editor:\n    adapter: mock\n")
    tools = {name: tool for name, (tool, _) in imagen.mcp_tools(config).items()}
    edit = tools["edit_image"]["inputSchema"]
    assert edit["required"] == ["image", "prompt"] and edit["additionalProperties"] is False
    assert set(edit["properties"]) == {"image", "prompt", "backend", "size", "seed", "strength"}
    assert edit["properties"]["backend"]["enum"] == ["editor", "mock"]
    assert "default: editor" in edit["properties"]["backend"]["description"]
    assert edit["properties"]["size"]["pattern"] == \
        tools["generate_image"]["inputSchema"]["properties"]["size"]["pattern"]
    assert tools["edit_image"]["outputSchema"] == tools["generate_image"]["outputSchema"]
    search = tools["search_images"]["inputSchema"]
    assert set(search["properties"]) == {"query", "since", "backend", "limit"}
    assert "required" not in search and search["additionalProperties"] is False
    assert search["properties"]["backend"]["enum"] == ["editor", "mock"]
    assert (search["properties"]["limit"]["minimum"], search["properties"]["limit"]["maximum"],
            search["properties"]["limit"]["default"]) == (1, 200, 20)
    since = re.compile(search["properties"]["since"]["pattern"])
    assert all(since.match(good) for good in ("2025-01-31", "12h", "7d", "2w"))
    assert not any(since.match(bad) for bad in ("yesterday", "7", "2025-1-31", "7d "))
    results = tools["search_images"]["outputSchema"]["properties"]["results"]
    assert results["items"]["required"] == ["id", "created_at", "backend", "path", "cloud",
                                            "exists"]
    assert results["items"]["properties"]["seed"] == {"type": ["integer", "null"]}
    assert tools["search_images"]["annotations"]["readOnlyHint"] is True


def mcp_made(out, ident):
    """The records a generate_image or edit_image call answered with."""
    result = answers(out)[ident]["result"]
    assert "isError" not in result, result
    return result["structuredContent"]["images"]


def test_mcp_edit_image_starts_from_the_file_at_its_size_on_the_edit_backend(
        env, write_config, tmp_path):
    config = mcp_config(write_config, tmp_path, "default_edit_backend: editor\nbackends:\n"
                        "  editor:\n    adapter: mock\n")
    _, out, _ = mcp_session(env, [call_tool(1, "generate_image", {
        "prompt": "a fox", "size": "96x64", "seed": 3})], config)
    first = mcp_made(out, 1)[0]
    _, out, log = mcp_session(env, [
        call_tool(2, "edit_image", {"image": first["path"], "prompt": "make it blue",
                                    "strength": 0.5}),
        call_tool(3, "generate_image", {"prompt": "like this", "size": "64x64",
                                        "images": [first["path"]], "strength": 0.25})], config)
    edited, = mcp_made(out, 2)
    assert (edited["backend"], edited["width"], edited["height"]) == ("editor", 96, 64)
    assert edited["strength"] == 0.5 and edited["prompt"] == "make it blue"
    assert [(i["path"], i["id"]) for i in edited["inputs"]] == [(first["path"], first["id"])]
    assert edited["path"] != first["path"] and os.path.isfile(edited["path"])
    referenced, = mcp_made(out, 3)
    assert (referenced["backend"], referenced["strength"]) == ("mock", 0.25)
    assert [i["sha256"] for i in referenced["inputs"]] == [first["sha256"]]
    assert log == ""


@pytest.mark.parametrize("tool,arguments,message", [
    ("edit_image", {"prompt": "x"}, "imagen: image is missing"),
    ("edit_image", {"image": "a.png"}, "imagen: prompt is missing"),
    ("edit_image", {"image": 1, "prompt": "x"}, "imagen: image must be a string (got 1)"),
    ("edit_image", {"image": "MISSING", "prompt": "x"}, "imagen: generate: --image MISSING: "),
    ("edit_image", {"image": "a.png", "prompt": "x", "steps": 4},
     "imagen: unknown argument 'steps' (known: "),
    ("edit_image", {"image": "a.png", "prompt": "x", "strength": 0},
     "imagen: --strength must be a number above 0 and at most 1 (got 0)"),
    ("generate_image", {"prompt": "x", "images": "a.png"},
     'imagen: images must be an array of strings (got "a.png")'),
    ("generate_image", {"prompt": "x", "images": ["a.png", 2]},
     "imagen: images must be an array of strings (got"),
    ("generate_image", {"prompt": "x", "strength": 0.5}, "imagen: --strength goes with --image"),
    ("generate_image", {"prompt": "x", "images": ["a.png"] * 9},
     "imagen: at most 8 input images are allowed (got 9)"),
    ("search_images", {"since": "yesterday"}, "imagen: history: --since must be a date"),
    ("search_images", {"limit": 500}, "imagen: limit must be a whole number from 1 to 200"),
    ("search_images", {"query": ["fox"]}, 'imagen: query must be a string (got ["fox"])'),
    ("search_images", {"backend": "nope"}, "imagen: unknown backend 'nope' (known: mock)"),
])
def test_mcp_bad_edit_and_search_arguments_are_tool_errors(
        env, write_config, tmp_path, tool, arguments, message):
    config = mcp_config(write_config, tmp_path)
    (tmp_path / "a.png").write_bytes(imagen.mock_png("a", 1, 64, 64))
    arguments = {key: str(tmp_path / value) if value == "MISSING" else value
                 for key, value in arguments.items()}
    _, out, _ = mcp_session(dict(env, HOME=str(tmp_path)), [call_tool(1, tool, arguments)],
                            config)
    result = answers(out)[1]["result"]
    assert result["isError"] is True and len(result["content"]) == 1
    assert result["content"][0]["text"].startswith(message.replace("MISSING", str(
        tmp_path / "MISSING")))
    assert not (tmp_path / "out").exists()


def test_mcp_search_images_finds_past_images_by_words_age_and_backend(env, write_config, tmp_path):
    config = mcp_config(write_config, tmp_path, "backends:\n  other:\n    adapter: mock\n")
    _, out, _ = mcp_session(env, [
        call_tool(1, "generate_image", {"prompt": "a red Fox", "size": "64x64"}),
        call_tool(2, "generate_image", {"prompt": "a fox at night", "size": "64x64",
                                        "backend": "other"}),
        call_tool(3, "generate_image", {"prompt": "a heron", "size": "64x64"})], config)
    made = {ident: mcp_made(out, ident)[0] for ident in (1, 2, 3)}
    os.remove(made[3]["path"])
    _, out, _ = mcp_session(env, [
        call_tool(4, "search_images", {"query": "FOX"}),
        call_tool(5, "search_images", {"query": "fox", "backend": "other"}),
        call_tool(6, "search_images", {"since": "1h", "limit": 2}),
        call_tool(7, "search_images", {"since": "2999-01-01"}),
        call_tool(8, "search_images")], config)
    by_id = {ident: answers(out)[ident]["result"] for ident in (4, 5, 6, 7, 8)}
    found = {ident: [row["path"] for row in result["structuredContent"]["results"]]
             for ident, result in by_id.items()}
    assert sorted(found[4]) == sorted([made[1]["path"], made[2]["path"]])
    assert found[5] == [made[2]["path"]] and len(found[6]) == 2 and found[7] == []
    rows = {row["path"]: row for row in by_id[8]["structuredContent"]["results"]}
    assert len(rows) == 3 and rows[made[3]["path"]]["exists"] is False
    fox = rows[made[1]["path"]]
    assert fox["exists"] is True and fox["cloud"] == "off" and fox["id"] == made[1]["id"]
    assert fox == dict(made[1], cloud="off", exists=True)      # as `history --json` has it
    assert [json.loads(block["text"]) for block in by_id[4]["content"]] == \
        by_id[4]["structuredContent"]["results"]


def test_mcp_generate_image_returns_a_preview_a_file_link_and_the_path(env, write_config, tmp_path):
    from urllib.parse import unquote
    out_dir = tmp_path / "out dir #1" / "été"
    config = imagen.load_config(str(write_config("output:\n  dir: \"%s\"\n" % out_dir)), env)
    code, out, log = mcp_session(env, [rpc(1, "initialize", MCP_INIT), call_tool(
        2, "generate_image", {"prompt": "a red fox", "size": "64x64", "seed": 42})], config)
    assert code == 0 and log == ""
    result = answers(out)[2]["result"]
    assert "isError" not in result
    image, link, text = result["content"]
    path = text["text"]
    assert text["type"] == "text" and path.startswith(str(out_dir)) and os.path.isfile(path)
    data = open(path, "rb").read()
    assert image["type"] == "image" and image["mimeType"] == "image/png"
    import base64
    assert base64.b64decode(image["data"]) == data          # 64x64 fits: the file itself
    assert link["type"] == "resource_link" and link["name"] == os.path.basename(path)
    assert link["uri"].startswith("file://") and " " not in link["uri"] and "#" not in link["uri"]
    assert "%20" in link["uri"] and "%23" in link["uri"] and "%C3%A9" in link["uri"]
    assert unquote(link["uri"][len("file://"):]) == path
    assert (link["mimeType"], link["size"]) == ("image/png", len(data))
    record = result["structuredContent"]["images"][0]
    assert record == dict(json.load(open(path + ".json")), path=path)
    assert record["seed"] == 42 and record["width"] == 64
    with imagen.open_ledger(env) as ledger:                 # the post-steps ran
        assert [row["path"] for row in ledger.rows()] == [path]


def test_mcp_preview_of_a_large_image_is_at_most_512_px(env, write_config, tmp_path):
    config = mcp_config(write_config, tmp_path)
    _, out, _ = mcp_session(env, [call_tool(1, "generate_image", {
        "prompt": "wide", "size": "1024x768", "count": 2})], config)
    content = out[0]["result"]["content"]
    assert [block["type"] for block in content] == ["image", "resource_link", "text"] * 2
    import base64
    width, height, rows = decode_png(base64.b64decode(content[0]["data"]))
    assert (width, height) == (512, 384)
    _, _, full = decode_png(open(content[2]["text"], "rb").read())
    a, b = full[0], full[1]
    assert rows[0][:3] == bytes((a[i] + a[i + 3] + b[i] + b[i + 3] + 2) // 4 for i in range(3))


def test_mcp_a_jpeg_output_gets_a_link_but_no_preview(env, write_config, tmp_path, monkeypatch):
    monkeypatch.setattr(imagen, "mock_png", lambda prompt, seed, w, h, inputs="": jpeg_bytes(w, h))
    config = mcp_config(write_config, tmp_path)
    _, out, _ = mcp_session(env, [call_tool(1, "generate_image", {"prompt": "x", "size": "64x64"})],
                            config)
    content = out[0]["result"]["content"]
    assert [block["type"] for block in content] == ["resource_link", "text"]
    assert content[0]["mimeType"] == "image/jpeg" and content[1]["text"].endswith(".jpg")


def test_mcp_an_older_session_gets_neither_structured_content_nor_links(env):
    _, out, _ = mcp_session(env, [rpc(1, "initialize", dict(MCP_INIT, protocolVersion="2025-03-26")),
                                  rpc(2, "tools/list"),
                                  call_tool(3, "generate_image", {"prompt": "x", "size": "64x64"})])
    by_id = answers(out)
    assert all("outputSchema" not in tool and "title" not in tool
               for tool in by_id[2]["result"]["tools"])
    result = by_id[3]["result"]
    assert "structuredContent" not in result
    assert [block["type"] for block in result["content"]] == ["image", "text"]


@pytest.mark.parametrize("arguments,message", [
    ({"prompt": "x", "size": "big"}, "imagen: size must be WxH, like 1024x1024 (got 'big')"),
    ({"prompt": "x", "seed": -1}, "imagen: seed must be a whole number from 0 to"),
    ({"prompt": "x", "steps": "4"}, 'imagen: steps must be an integer (got "4")'),
    ({"prompt": "x", "count": True}, "imagen: count must be an integer (got true)"),
    ({"prompt": "x", "backend": "nope"}, "imagen: unknown backend 'nope' (known: broken, mock)"),
    ({"prompt": "x", "colour": "red"}, "imagen: unknown argument 'colour' (known: prompt,"),
    ({"size": "64x64"}, "imagen: prompt is missing"),
    ({"prompt": "   "}, "imagen: prompt is empty"),
    ({"prompt": "x", "backend": "broken"}, "imagen: broken: the GPU caught fire"),
])
def test_mcp_bad_arguments_and_failed_generations_are_tool_errors(
        env, write_config, tmp_path, arguments, message):
    config = mcp_config(write_config, tmp_path, "backends:\n  broken:\n    adapter: mock\n"
                        "    fail: the GPU caught fire\n")
    _, out, _ = mcp_session(env, [call_tool(1, "generate_image", arguments), rpc(2, "ping")], config)
    result = answers(out)[1]["result"]
    assert result["isError"] is True and len(result["content"]) == 1
    assert result["content"][0]["type"] == "text"
    assert result["content"][0]["text"].startswith(message)
    assert not (tmp_path / "out").exists()


def test_mcp_list_backends_reports_rows_and_the_gates(env, write_config, tmp_path):
    config = mcp_config(write_config, tmp_path, "backends:\n  two:\n    adapter: mock\n"
                        "    max_concurrency: 2\n")
    _, out, _ = mcp_session(env, [call_tool(1, "list_backends"),
                                  call_tool(2, "list_backends", {"x": 1})], config)
    by_id = answers(out)
    rows = by_id[1]["result"]["structuredContent"]["backends"]
    assert [(row["name"], row["max_concurrency"], row["running"]) for row in rows] == \
        [("mock", 8, 0), ("two", 2, 0)]
    assert json.loads(by_id[1]["result"]["content"][0]["text"]) == {"backends": rows}
    assert by_id[2]["result"]["isError"] is True


def test_mcp_progress_follows_the_backend_at_most_10_a_second(env, write_config, tmp_path):
    config = mcp_config(write_config, tmp_path, "backends:\n  slow:\n    adapter: mock\n"
                        "    delay: 0.4\n")
    _, out, _ = mcp_session(env, [
        call_tool(1, "generate_image", {"prompt": "x", "size": "64x64", "backend": "slow"},
                  progressToken=77),
        call_tool(2, "generate_image", {"prompt": "y", "size": "64x64"})], config)
    progress = [m["params"] for m in out if m.get("method") == "notifications/progress"]
    assert all(p["progressToken"] == 77 and p["total"] == 100 for p in progress)
    values = [p["progress"] for p in progress]
    assert values == sorted(set(values)) and 0 <= values[0] < values[-1] <= 100
    assert 3 <= len(progress) <= 0.4 * 10 + 1       # the mock reports every 50 ms
    assert progress[0]["message"].startswith("mock: working")
    assert out[-1]["id"] == 1                    # the notifications came before the answer


class PipedMcp:
    """An McpServer in this process (so that it can use the fakes' fixtures), fed through a
    pipe as a client would: messages arrive while calls run."""

    def __init__(self, config, env):
        import io
        import threading
        read_fd, write_fd = os.pipe()
        self.out, self.log = io.BytesIO(), io.StringIO()
        self.server = imagen.McpServer(config, env, self.out, self.log)
        self.stdin = os.fdopen(write_fd, "wb", buffering=0)
        self.thread = threading.Thread(target=self.server.serve,
                                       args=(os.fdopen(read_fd, "rb"),), daemon=True)
        self.thread.start()

    def send(self, message):
        self.stdin.write(json.dumps(message).encode() + b"\n")

    def messages(self):
        return [json.loads(line) for line in self.out.getvalue().splitlines()]

    def close(self, timeout=10):
        """End stdin; the server returns once its calls have ended."""
        self.stdin.close()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the server did not end: %s" % self.log.getvalue()


def cancel_message(ident):
    return {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": ident}}


@pytest.mark.parametrize("jobs", [True, False], ids=["newer server", "older server"])
def test_mcp_cancel_reaches_the_comfyui_prompt(comfyui, write_config, env, jobs):
    fake = comfyui(job_seconds=30, jobs=jobs)
    piped = PipedMcp(imagen.load_config(str(comfy_config(write_config, fake.url)), env), env)
    piped.send(call_tool(1, "generate_image", {"prompt": "x"}))
    ours = poll(lambda: fake.running, message="our prompt running")
    piped.send(cancel_message(1))
    piped.close()
    if jobs:
        assert fake.job_cancels == [ours] and fake.deleted == []
    else:
        assert fake.deleted == [ours] and fake.interrupts == [ours]
    assert [m for m in piped.messages() if m.get("id") == 1] == []


def test_mcp_cancel_reaches_the_replicate_prediction(replicate, env):
    replicate.configure(wait=1)
    replicate.api.duration = 30
    piped = PipedMcp(imagen.load_config(str(replicate.path), env), dict(env, **TOKEN_ENV))
    piped.send(call_tool("r", "generate_image", {"prompt": "x"}))
    poll(lambda: replicate.api.predictions, message="the prediction")
    piped.send(cancel_message("r"))
    piped.close()
    assert [r.path for r in replicate.api.cancels] == ["/v1/predictions/fake00000001/cancel"]
    assert [m for m in piped.messages() if m.get("id") == "r"] == []


# ----- over real stdio, in a subprocess -----

NOISY_MCP = """
import os, sys
sys.path.insert(0, sys.argv[1])
import imagen
quiet_png = imagen.mock_png
def noisy_png(*args):
    print("a stray print")
    os.system("echo a child writing to fd 1")
    return quiet_png(*args)
imagen.mock_png = noisy_png
sys.exit(imagen.main(sys.argv[2:]))
"""


def test_mcp_stdout_carries_only_protocol_lines_whatever_prints(mcp, tmp_path):
    script = tmp_path / "noisy.py"
    script.write_text(NOISY_MCP)
    config = tmp_path / "mcp.yaml"
    config.write_text("output:\n  dir: %s\n" % (tmp_path / "out"))
    server = mcp(argv=[sys.executable, str(script), HERE, "--config", str(config), "mcp"])
    assert server.call("initialize", MCP_INIT)["result"]["protocolVersion"] == "2025-11-25"
    server.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    result = server.call("tools/call", {"name": "generate_image",
                                        "arguments": {"prompt": "x", "size": "64x64"}})["result"]
    assert os.path.isfile(result["content"][-1]["text"])
    assert server.close() == 0
    assert all(line.endswith(b"\n") and b"\n" not in line[:-1] for line in server.lines)
    assert all(m["jsonrpc"] == "2.0" for m in server.messages) and len(server.messages) == 2
    assert "a stray print" in server.stderr and "a child writing to fd 1" in server.stderr


def test_mcp_malformed_lines_get_32700_and_the_server_goes_on(mcp):
    server = mcp()
    for raw in (b"not json\n", b'{"jsonrpc": "2.0", "id": 1,\n', b"\xff\xfe{}\n",
                b"[" * 100000 + b"\n", b" " * (4 * 1024 * 1024 + 10) + b"{}\n", b"\n"):
        server.send(raw)
    assert server.call("ping") == {"jsonrpc": "2.0", "id": 1, "result": {}}
    errors = server.messages[:-1]
    assert [m["error"]["code"] for m in errors] == [-32700] * 5
    assert all(m["id"] is None for m in errors)
    assert "longer than" in errors[4]["error"]["message"]
    assert server.close() == 0


def test_mcp_exits_0_when_stdin_closes_after_finishing_the_calls_in_flight(mcp, tmp_path):
    server = mcp("output:\n  dir: %s\nbackends:\n  slow:\n    adapter: mock\n    delay: 0.2\n"
                 % (tmp_path / "out"))
    server.request("tools/call", {"name": "generate_image", "arguments": {
        "prompt": "x", "size": "64x64", "backend": "slow"}}, ident="last")
    assert server.close() == 0
    assert server.answer("last", timeout=1)["result"]["content"][-1]["type"] == "text"


def test_mcp_calls_run_concurrently_under_the_backends_limits(mcp, tmp_path):
    server = mcp("output:\n  dir: %s\nbackends:\n  slow:\n    adapter: mock\n    gate: %s\n"
                 "    max_concurrency: 1\n    max_queue: 0\n" % (tmp_path / "out", tmp_path / "gate"))
    slow = {"name": "generate_image", "arguments": {"prompt": "s", "size": "64x64",
                                                      "backend": "slow"}}
    first = server.request("tools/call", dict(slow, _meta={"progressToken": 1}))
    server.wait_for(lambda m: m.get("method") == "notifications/progress")   # it is running
    second = server.request("tools/call", slow)
    fast = server.request("tools/call", {"name": "generate_image", "arguments": {
        "prompt": "f", "size": "64x64"}})
    busy = server.answer(second)["result"]
    assert busy["isError"] is True
    assert busy["content"][0]["text"].startswith("imagen: backend slow is busy: 1 running")
    server.answer(fast)
    release(tmp_path)                                        # the slow one runs until now
    server.answer(first)
    order = [m["id"] for m in server.messages if "id" in m]
    assert order.index(fast) < order.index(first)           # answers leave when ready
    assert server.close() == 0


def test_mcp_cancelled_call_stops_its_backend_job_and_gets_no_answer(mcp, tmp_path):
    server = mcp("output:\n  dir: %s\nbackends:\n  slow:\n    adapter: mock\n    delay: 30\n"
                 % (tmp_path / "out"))
    ident = server.request("tools/call", {"name": "generate_image", "arguments": {
        "prompt": "x", "size": "64x64", "backend": "slow"}, "_meta": {"progressToken": "t"}})
    server.wait_for(lambda m: m.get("method") == "notifications/progress")
    server.send({"jsonrpc": "2.0", "method": "notifications/cancelled",
                 "params": {"requestId": ident, "reason": "user pressed stop"}})
    assert server.call("ping")["result"] == {}
    assert server.close(timeout=5) == 0          # the mock gave up at its next tick
    assert not any(m.get("id") == ident for m in server.messages)
    assert not (tmp_path / "out").exists()
    assert "call 1 canceled: user pressed stop" in server.stderr


def test_mcp_sigterm_cancels_the_calls_in_flight_and_exits_130(mcp, tmp_path):
    server = mcp("output:\n  dir: %s\nbackends:\n  slow:\n    adapter: mock\n    delay: 30\n"
                 % (tmp_path / "out"))
    server.request("tools/call", {"name": "generate_image", "arguments": {
        "prompt": "x", "size": "64x64", "backend": "slow"}, "_meta": {"progressToken": 1}})
    server.wait_for(lambda m: m.get("method") == "notifications/progress")
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(5) == 130


def test_mcp_speaks_the_2026_revision_to_requests_that_carry_it(env):
    modern = {"_meta": MODERN_META}
    _, out, _ = mcp_session(env, [
        rpc(1, "server/discover", modern),
        rpc(2, "tools/list", modern),
        rpc(3, "tools/call", dict(modern, name="generate_image",
                                  arguments={"prompt": "x", "size": "64x64"})),
        rpc(4, "tools/list", {"_meta": dict(MODERN_META, **{
            "io.modelcontextprotocol/protocolVersion": "2030-01-01"})}),
        rpc(5, "tools/list", {"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}),
        rpc(6, "server/discover"),
        rpc(7, "tools/list")])
    by_id = answers(out)
    server_info = {"io.modelcontextprotocol/serverInfo": {
        "name": "imagen", "version": imagen.version_string()}}
    discover = by_id[1]["result"]
    assert discover["supportedVersions"][0] == "2026-07-28"
    assert {"2025-11-25", "2025-06-18", "2025-03-26"} <= set(discover["supportedVersions"])
    assert discover["capabilities"] == {"tools": {"listChanged": False}}
    assert (discover["resultType"], discover["_meta"]) == ("complete", server_info)
    assert discover["ttlMs"] >= 0 and discover["cacheScope"] in ("public", "private")
    listed = by_id[2]["result"]
    assert listed["resultType"] == "complete" and listed["ttlMs"] >= 0 and listed["tools"]
    called = by_id[3]["result"]
    assert called["resultType"] == "complete" and called["structuredContent"]["images"]
    assert by_id[4]["error"]["code"] == -32022
    assert by_id[4]["error"]["data"] == {"supported": discover["supportedVersions"],
                                         "requested": "2030-01-01"}
    assert by_id[5]["error"]["code"] == -32602 and "clientCapabilities" in by_id[5]["error"]["message"]
    assert by_id[6]["result"] == discover            # asked without _meta: the same answer
    assert "resultType" not in by_id[7]["result"]          # a handshake-era request


def test_mcp_never_opens_a_tmux_preview(env, write_config, tmp_path):
    env = dict(env, IMAGEN_PREVIEW="on")        # outside tmux, `on` would be exit 2
    _, out, _ = mcp_session(env, [call_tool(1, "generate_image", {"prompt": "x", "size": "64x64"})],
                            mcp_config(write_config, tmp_path))
    assert "isError" not in out[0]["result"]


@pytest.mark.parametrize("text", [
    '{"jsonrpc": "2.0", "id": 1, "method": "ping"}', '[1, 2.5, -3e2, "\\u00e9\\n", null, true]',
    '"x"', "1", '{"a": {"b": [{}]}}', '{"a": 1} x', "{'a': 1}", '{"a": NaN}', "[1,]", '"\\ud800"',
    '{"a": "\x01"}'])
def test_mcp_reads_json_exactly_as_the_json_module_does(text):
    try:
        want = json.loads(text)
    except ValueError as exc:
        with pytest.raises(ValueError) as error:
            imagen.mcp_loads(text)
        assert str(error.value) == str(exc)
        return
    got = imagen.mcp_loads(text)
    assert json.dumps(got) == json.dumps(want)


def test_mcp_writes_json_the_json_module_reads_back():
    value = {"a": [1, -2.5, 1e300, "é\n\"\u2028", None, True, False, {"b": []}], "c": {}}
    line = imagen.mcp_dumps(value)
    assert json.loads(line) == value and line.isascii() and "\n" not in line
    with pytest.raises(TypeError):
        imagen.mcp_dumps({"x": float("nan")})


def test_file_uri_percent_encodes_everything_but_slashes():
    assert imagen.file_uri("/a b/#1?x%/é.png") == "file:///a%20b/%231%3Fx%25/%C3%A9.png"


# ----- the official MCP Python SDK as the client -----

def need_mcp_sdk():
    """Skipped only where the SDK cannot run; from 3.10 on the test venvs have it."""
    if sys.version_info < (3, 10):
        pytest.skip("the MCP Python SDK (mcp on PyPI) needs Python 3.10 or newer")
    try:
        import mcp  # noqa: F401
    except ImportError:
        pytest.fail("the MCP Python SDK is missing: pip install mcp (the Makefile's venvs "
                    "have it; delete the .ready file of one made before to rebuild it)")


def run_sdk_client(env, tmp_path, config_text, body, mode="auto"):
    """Run `body(client)` (async) with the SDK's Client connected to `imagen mcp` over stdio."""
    import anyio
    from mcp import Client, StdioServerParameters
    config = tmp_path / "sdk.yaml"
    config.write_text("output:\n  dir: %s\n%s" % (tmp_path / "out", config_text))
    params = StdioServerParameters(command=sys.executable,
                                   args=[IMAGEN, "--config", str(config), "mcp"],
                                   env=env, cwd=str(tmp_path))

    async def main():
        async with Client(params, mode=mode, read_timeout_seconds=20) as client:
            return await body(client)
    return anyio.run(main)


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_mcp_sdk_client_lists_and_calls_the_tools(env, tmp_path, mode):
    need_mcp_sdk()
    import base64

    async def body(client):
        tools = await client.list_tools()
        made = await client.call_tool("generate_image", {"prompt": "a fox", "size": "96x64",
                                                         "seed": 5})
        failed = await client.call_tool("generate_image", {"prompt": "a fox", "size": "huge"})
        backends = await client.call_tool("list_backends", {})
        edited = await client.call_tool("edit_image", {"image": made.content[-1].text,
                                                       "prompt": "now in snow", "strength": 0.6})
        found = await client.call_tool("search_images", {"query": "fox", "since": "1d"})
        return client.session.protocol_version, tools, made, failed, backends, edited, found
    version, tools, made, failed, backends, edited, found = run_sdk_client(
        env, tmp_path, "", body, mode)
    assert version == ("2026-07-28" if mode == "auto" else "2025-11-25")
    assert [tool.name for tool in tools.tools] == ["generate_image", "edit_image",
                                                   "search_images", "list_backends"]
    assert not made.is_error
    image, link, text = made.content
    data = open(text.text, "rb").read()
    assert image.mime_type == "image/png" and base64.b64decode(image.data) == data
    assert decode_png(data)[:2] == (96, 64)
    assert link.type == "resource_link" and str(link.uri).startswith("file:///")
    assert link.size == len(data) and link.name == os.path.basename(text.text)
    assert made.structured_content["images"][0]["seed"] == 5      # validated by the SDK too
    assert failed.is_error and failed.content[0].text.startswith("imagen: size must be WxH")
    assert backends.structured_content["backends"][0]["name"] == "mock"
    assert not edited.is_error and [block.type for block in edited.content] == \
        ["image", "resource_link", "text"]
    record = edited.structured_content["images"][0]               # validated by the SDK too
    assert (record["width"], record["height"], record["strength"]) == (96, 64, 0.6)
    assert record["inputs"][0]["path"] == text.text
    assert not found.is_error                                     # validated by the SDK too
    assert [row["path"] for row in found.structured_content["results"]] == [text.text]


def test_mcp_sdk_client_gets_progress_and_can_cancel(env, tmp_path):
    need_mcp_sdk()
    import anyio

    async def body(client):
        seen = []
        done = anyio.Event()

        async def on_progress(progress, total, message):
            seen.append((progress, total, message))

        async def on_stop(progress, total, message):
            done.set()
        made = await client.call_tool("generate_image", {"prompt": "x", "size": "64x64",
                                                         "backend": "slow"},
                                      progress_callback=on_progress)
        async with anyio.create_task_group() as group:
            async def doomed():
                await client.call_tool("generate_image", {"prompt": "y", "size": "64x64",
                                                          "backend": "stuck"},
                                       progress_callback=on_stop)
            group.start_soon(doomed)
            await done.wait()
            group.cancel_scope.cancel()       # the SDK sends notifications/cancelled
        for _ in range(250):         # the canceled job ends at the mock's next tick
            after = await client.call_tool("list_backends", {})
            rows = {row["name"]: row for row in after.structured_content["backends"]}
            if rows["stuck"]["running"] == 0:
                break
            await anyio.sleep(0.02)
        return seen, made, rows
    seen, made, rows = run_sdk_client(env, tmp_path, (
        "backends:\n  slow:\n    adapter: mock\n    delay: 0.4\n"
        "  stuck:\n    adapter: mock\n    delay: 60\n"), body)
    assert not made.is_error and len(seen) >= 2
    assert [p for p, _, _ in seen] == sorted(p for p, _, _ in seen) and seen[-1][1] == 100
    assert rows["stuck"]["running"] == 0
    assert [path.name for path in (tmp_path / "out").rglob("*.png")] == \
        [os.path.basename(made.content[-1].text)]


# ===== Replicate adapter (against the fake in conftest.py) =====

TOKEN_ENV = {"REPLICATE_API_TOKEN": REPLICATE_TOKEN}
SCHNELL = "black-forest-labs/flux-schnell"


@pytest.fixture
def replicate(replicate_api, write_config, run_main):
    """The fake API plus `configure(**block)` and `generate(*flags)` that talk to it."""
    class Harness:
        api = replicate_api

        def configure(self, model=SCHNELL, **block):
            lines = ["default_backend: r", "backends:", "  r:", "    adapter: replicate",
                     "    model: %s" % model, "    base_url: %s" % replicate_api.url]
            lines += ["    %s: %s" % (key, json.dumps(value)) for key, value in block.items()]
            self.path = write_config("\n".join(lines) + "\n")
            return self.path

        def generate(self, *flags, token=REPLICATE_TOKEN, extra_env=None):
            env = dict({"REPLICATE_API_TOKEN": token} if token is not None else {},
                       **(extra_env or {}))
            return run_main("--config", self.path, "generate", "a red fox", *flags, extra_env=env)

        def record(self, *flags):
            run = self.generate("--json", "-o", "out/fox.png", *flags)
            assert run.code == 0, run
            return json.loads(run.lines[0])

    harness = Harness()
    harness.configure()
    return harness


def sent_input(request):
    return request.json()["input"]


def test_replicate_official_model_finishes_in_one_create_request(replicate, tmp_path):
    record = replicate.record("--seed", "42")
    (create,) = replicate.api.creates
    assert create.path == "/v1/models/black-forest-labs/flux-schnell/predictions"
    assert list(create.json()) == ["input"]
    assert create.headers["authorization"] == "Bearer " + REPLICATE_TOKEN
    assert create.headers["prefer"] == "wait=60" and create.headers["content-type"] == "application/json"
    assert replicate.api.polls == []
    assert sent_input(create) == {"prompt": "a red fox", "aspect_ratio": "1:1", "megapixels": "1",
                                  "num_inference_steps": 4, "seed": 42, "output_format": "png"}
    assert decode_png((tmp_path / "out" / "fox.png").read_bytes())[:2] == (1024, 1024)
    assert record["model"] == SCHNELL and record["adapter"] == "replicate"
    assert record["seed"] == 42 and record["steps"] == 4 and record["cost_usd"] == 0.003
    assert record["backend_meta"]["prediction_id"] == "fake00000001"


def test_replicate_versioned_model_posts_the_version_to_predictions(replicate):
    replicate.configure(model="acme/sdxl-like:" + FAKE_VERSION)
    record = replicate.record("--seed", "5", "--size", "1000x700", "--negative", "blurry",
                              "--steps", "30")
    (create,) = replicate.api.creates
    assert create.path == "/v1/predictions" and create.json()["version"] == FAKE_VERSION
    assert sent_input(create) == {"prompt": "a red fox", "width": 1000, "height": 704,
                                  "num_inference_steps": 30, "seed": 5, "negative_prompt": "blurry"}
    assert (record["width"], record["height"], record["steps"]) == (1000, 704, 30)
    assert record["model"] == "acme/sdxl-like:" + FAKE_VERSION
    assert record["cost_usd"] is None     # not in the price table, no hardware configured


@pytest.mark.parametrize("size,ratio,megapixels,actual", [
    ("1024x1024", "1:1", "1", (1024, 1024)),
    ("1920x1080", "16:9", "1", (1344, 768)),
    ("1536x768", "16:9", "1", (1344, 768)),      # 2:1 is nearer 16:9 than 21:9 on a log scale
    ("2560x1080", "21:9", "1", (1536, 640)),
    ("768x1024", "3:4", "1", (896, 1152)),
    ("512x512", "1:1", "0.25", (512, 512)),
    ("640x360", "16:9", "0.25", (672, 384)),
    ("724x724", "1:1", "0.25", (512, 512)),      # 0.5 MP and below: the quarter-megapixel size
    ("725x725", "1:1", "1", (1024, 1024)),
])
def test_replicate_flux_size_maps_to_nearest_aspect_ratio_and_real_size_is_read_back(
        replicate, size, ratio, megapixels, actual):
    record = replicate.record("--size", size)
    model_input = sent_input(replicate.api.creates[0])
    assert (model_input["aspect_ratio"], model_input["megapixels"]) == (ratio, megapixels)
    assert (record["width"], record["height"]) == actual and record["requested_size"] == size


@pytest.mark.parametrize("size,width,height", [
    ("1024x768", 1024, 768), ("1000x1000", 992, 992), ("2048x100", 1440, 256), ("64x4096", 256, 1440),
])
def test_replicate_pro_models_get_custom_width_and_height_in_multiples_of_32(
        replicate, size, width, height):
    replicate.configure(model="black-forest-labs/flux-1.1-pro")
    record = replicate.record("--size", size)
    model_input = sent_input(replicate.api.creates[0])
    assert (model_input["aspect_ratio"], model_input["width"], model_input["height"]) == (
        "custom", width, height)
    assert (record["width"], record["height"]) == (width, height)
    assert "steps" not in model_input and "num_inference_steps" not in model_input


def test_replicate_ultra_takes_an_aspect_ratio_only(replicate):
    replicate.configure(model="black-forest-labs/flux-1.1-pro-ultra")
    replicate.record("--size", "1536x640")
    model_input = sent_input(replicate.api.creates[0])
    assert model_input["aspect_ratio"] == "21:9"
    assert not {"width", "height", "megapixels"} & set(model_input)


@pytest.mark.parametrize("model,flag,sent,key", [
    (SCHNELL, [], 4, "num_inference_steps"),
    (SCHNELL, ["--steps", "9"], 4, "num_inference_steps"),
    ("black-forest-labs/flux-dev", [], 28, "num_inference_steps"),
    ("black-forest-labs/flux-dev", ["--steps", "60"], 50, "num_inference_steps"),
    ("black-forest-labs/flux-pro", ["--steps", "12"], 12, "steps"),
])
def test_replicate_steps_follow_each_familys_limits(replicate, model, flag, sent, key):
    replicate.configure(model=model)
    record = replicate.record(*flag)
    assert sent_input(replicate.api.creates[0])[key] == sent and record["steps"] == sent


def test_replicate_steps_out_of_range_are_clamped_with_a_warning(replicate):
    run = replicate.generate("--steps", "9", "-o", "a.png")
    assert run.code == 0 and "r: black-forest-labs/flux-schnell takes 1..4 steps; using 4" in run.err


def test_replicate_flux_gets_no_negative_prompt_and_says_so(replicate):
    run = replicate.generate("--negative", "blurry", "-o", "a.png")
    assert run.code == 0 and "has no negative prompt; it is ignored" in run.err
    assert "negative_prompt" not in sent_input(replicate.api.creates[0])


def test_replicate_block_input_is_passed_through_last(replicate):
    replicate.configure(input={"output_format": "webp", "go_fast": False, "aspect_ratio": "4:3"})
    record = json.loads(replicate.generate("--json", "--size", "1024x1024").out)
    model_input = sent_input(replicate.api.creates[0])
    assert model_input["go_fast"] is False and model_input["aspect_ratio"] == "4:3"
    assert record["mime_type"] == "image/webp" and record["path"].endswith(".webp")
    assert (record["width"], record["height"]) == (1152, 896)


def test_replicate_jpg_output_is_saved_as_jpg(replicate):
    replicate.configure(input={"output_format": "jpg"})
    record = json.loads(replicate.generate("--json").out)
    assert record["mime_type"] == "image/jpeg" and record["path"].endswith(".jpg")


def test_replicate_prediction_that_outlives_the_wait_window_is_polled_with_progress(
        replicate, env, tmp_path, fake_clock):
    class Terminal:
        text = ""

        def write(self, text):
            self.text += text

        def flush(self):
            pass

        def isatty(self):
            return True
    replicate.configure(wait=1)
    replicate.api.duration = 1.3
    terminal = Terminal()
    (record,) = imagen.generate("a fox", config=imagen.load_config(str(replicate.path), env),
                                env=dict(env, **TOKEN_ENV), console=imagen.Console(stream=terminal),
                                output=str(tmp_path / "a.png"))
    (create,) = replicate.api.creates
    assert create.headers["prefer"] == "wait=1"
    polls = replicate.api.polls
    assert polls and all(p.path == "/v1/predictions/fake00000001" for p in polls)
    # 0.2 s apart while a tenth of the prediction's age is less than that
    assert fake_clock.slept == [0.2] * len(polls)
    assert record["backend_meta"]["status"] == "succeeded"
    assert "r: fake00000001 processing" in terminal.text          # status and percentage
    assert re.search(r"processing [1-9]\d%", terminal.text)


def test_replicate_progress_reaches_an_on_progress_listener_as_a_percentage(replicate, env, tmp_path,
                                                                           fake_clock):
    replicate.configure(wait=1)
    replicate.api.hold_create, replicate.api.duration = 0.1, 0.4   # answers while processing
    heard = []
    console = imagen.Console(quiet=True, on_progress=lambda *report: heard.append(report))
    imagen.generate("a fox", config=imagen.load_config(str(replicate.path), env),
                    env=dict(env, **TOKEN_ENV), console=console, output=str(tmp_path / "a.png"))
    counted = [(done, total) for message, done, total in heard if done is not None]
    assert counted and all(total == 100 and 0 <= done <= 100 for done, total in counted)
    assert any(re.search(r"processing %d%%$" % done, message) for message, done, _ in heard
               if done is not None)


def test_replicate_wait_window_never_outlasts_the_timeout(replicate, fake_clock):
    replicate.api.duration = 0.1
    replicate.record("--timeout", "6.5")
    # 1.5 s of the timeout stay free to read the answer
    assert replicate.api.creates[0].headers["prefer"] == "wait=4"
    # and should imagen die, Replicate stops the prediction itself at the deadline
    assert replicate.api.creates[0].headers["cancel-after"] == "7s"


@pytest.mark.parametrize("logs,percent", [
    ("Using seed: 1\n  0%|          | 0/4\n 50%|#####     | 2/4 [00:01<00:01]\n", 50),
    ("Using seed: 1\n", None), ("", None), (None, None),
])
def test_log_percent_is_the_last_progress_bar_value(logs, percent):
    assert imagen.log_percent(logs) == percent


def test_replicate_single_url_output_of_pro_models(replicate):
    replicate.configure(model="black-forest-labs/flux-pro")
    record = replicate.record()
    assert record["cost_usd"] == 0.055 and record["mime_type"] == "image/png"


def test_replicate_data_uri_output_is_decoded(replicate, tmp_path):
    replicate.api.scheme = "data"
    replicate.record("--size", "512x512")
    assert decode_png((tmp_path / "out" / "fox.png").read_bytes())[:2] == (512, 512)
    assert not replicate.api.requests_to("GET", ".png")


@pytest.mark.parametrize("scheme", ["file:///etc/", "ftp://example.com/", "javascript:"])
def test_replicate_output_with_another_scheme_is_refused(replicate, tmp_path, scheme):
    replicate.api.scheme = scheme
    run = replicate.generate("-o", "a.png")
    assert run.code == 1 and "refusing output" in run.err and "only https, http and data" in run.err
    assert listing(tmp_path) == ["imagen.yaml"]


@pytest.mark.parametrize("base,shown,why", [
    ("http://127.0.0.1:99999/x?sig=s3cr3t&", "http://127.0.0.1:99999/x", "port"),
    ("http://127.0.0.1:abc/", "http://127.0.0.1:abc/out-0.png", "port"),
    ("http://[::1/", "http://[::1/out-0.png", "IPv6"),
    ("http:///", "http:///out-0.png", "no host"),
])
def test_replicate_output_url_that_cannot_be_fetched_is_exit_1_naming_it(
        replicate, tmp_path, base, shown, why):
    replicate.api.scheme = base
    run = replicate.generate("-o", "a.png")
    assert run.code == 1 and run.err.count("\n") == 1, run
    assert run.err.startswith("imagen: r: output %s" % shown) and why in run.err
    assert "s3cr3t" not in run.err and listing(tmp_path) == ["imagen.yaml"]


def test_replicate_download_is_capped(replicate, monkeypatch):
    monkeypatch.setattr(imagen, "REPLICATE_MAX_DOWNLOAD", 4096)
    replicate.api.file_body = b"\x89PNG" + b"x" * 5000
    run = replicate.generate("-o", "a.png")
    assert run.code == 1 and "larger than 4096 bytes" in run.err


def test_replicate_output_that_is_not_an_image_is_exit_1(replicate, tmp_path):
    replicate.api.file_body = b"<html>gateway error</html>"
    run = replicate.generate("-o", "a.png")
    assert run.code == 1 and "r: bad image from http://127.0.0.1:" in run.err
    assert "not an image" in run.err and listing(tmp_path) == ["imagen.yaml"]


def test_replicate_success_without_output_is_exit_1(replicate):
    replicate.api.made = 0
    run = replicate.generate("-o", "a.png")
    assert run.code == 1 and run.err == "imagen: r: prediction fake00000001 finished without output\n"


@pytest.mark.parametrize("override,outcome,message", [
    ({"urls": "x"}, "succeeded", None),
    ({"urls": {"get": 5, "cancel": []}}, "succeeded", None),
    ({"metrics": "x"}, "succeeded", None),
    ({"metrics": {"predict_time": "x"}}, "succeeded", None),
    ({"logs": 5}, "succeeded", None),
    ({"logs": ["50%|"]}, "succeeded", None),
    ({"data_removed": "x", "output": None}, "succeeded", "finished without output"),
    ({"output": 5}, "succeeded", "prediction fake00000001 finished without output"),
    ({"output": {"url": "x"}}, "succeeded", "prediction fake00000001 finished without output"),
    ({"status": 7}, "succeeded", "prediction fake00000001 has status 7, which Replicate never gives"),
    ({"status": None}, "succeeded", "prediction fake00000001 has status null, which Replicate never gives"),
    ({"error": {}}, "failed", "prediction fake00000001 failed: Replicate gave no reason"),
    ({"error": {"code": "E1"}}, "failed", 'prediction fake00000001 failed: {"code": "E1"}'),
    ({"id": 5}, "succeeded", "create answered HTTP 202 without a prediction id"),
    ({"id": ["x"]}, "succeeded", "create answered HTTP 202 without a prediction id"),
])
def test_replicate_fields_of_the_wrong_type_are_tolerated_or_a_backend_error(
        replicate, tmp_path, fake_clock, override, outcome, message):
    # a time-billed model: its cost is read from `metrics`
    replicate.configure(model="acme/sdxl-like:" + FAKE_VERSION, hardware="a40")
    # the create answers while the prediction still runs, so `urls.get` is polled
    replicate.api.hold_create, replicate.api.duration = 0.01, 0.05
    replicate.api.outcome, replicate.api.override = outcome, override
    run = replicate.generate("-o", "a.webp", "--timeout", "5")     # the model makes WebP
    assert "internal error" not in run.err and "Traceback" not in run.err
    if message is None:
        assert run.code == 0 and run.err == "" and (tmp_path / "a.webp").exists()
    else:
        assert run.code == 1 and run.err.startswith("imagen: r: ") and message in run.err
        assert run.err.count("\n") == 1 and not (tmp_path / "a.webp").exists()


def test_replicate_poll_answer_without_an_id_is_still_the_prediction_asked_for(
        replicate, fake_clock):
    replicate.api.hold_create, replicate.api.duration = 0.01, 0.5
    replicate.api.script("GET", "/v1/predictions/", (200, {}, {"status": "processing"}))
    record = replicate.record()
    assert record["backend_meta"]["prediction_id"] == "fake00000001"
    polls = [p.path for p in replicate.api.polls]
    assert len(polls) >= 2 and set(polls) == {"/v1/predictions/fake00000001"}


def test_replicate_sends_the_token_only_to_its_own_api(replicate, env):
    config = imagen.load_config(str(replicate.path), env)
    adapter = imagen.make_adapter("r", config, dict(env, **TOKEN_ENV), imagen.Console())
    own = {"urls": {"get": replicate.api.url + "/predictions/p1"}}
    foreign = {"urls": {"get": "https://elsewhere.example/v1/predictions/p1"}}
    assert adapter._api_url(own, "get", "/predictions/p1") == replicate.api.url + "/predictions/p1"
    assert adapter._api_url(foreign, "get", "/predictions/p1") == replicate.api.url + "/predictions/p1"
    replicate.api.scheme = "http"
    replicate.record()
    (download,) = replicate.api.requests_to("GET", ".png")
    assert "authorization" not in download.headers


def test_replicate_create_never_rides_a_reused_connection(replicate):
    replicate.configure(model="black-forest-labs/flux-pro")
    replicate.record("--count", "2")
    ports = [r.client_port for _, r in replicate.api.log if r.method == "POST"]
    assert len(ports) == 2 and ports[0] != ports[1]


def test_replicate_processing_with_complete_output_is_done(replicate):
    replicate.configure(wait=1)
    replicate.api.outcome = "stalled"          # never says succeeded
    record = replicate.record("--timeout", "30")
    assert record["backend_meta"]["status"] == "processing"


@pytest.mark.parametrize("outcome,error,message", [
    ("failed", "All generated images contained NSFW content. Try running it again with a "
     "different prompt.", "prediction fake00000001 failed: All generated images contained NSFW"),
    ("failed", None, "prediction fake00000001 failed: Replicate gave no reason"),
    ("canceled", None, "prediction fake00000001 was canceled"),
    ("aborted", None, "prediction fake00000001 was aborted"),
])
def test_replicate_final_statuses_end_with_the_models_words(replicate, tmp_path, outcome, error, message):
    replicate.api.outcome, replicate.api.error = outcome, error
    run = replicate.generate("-o", "a.png")
    assert run.code == 1 and run.err.startswith("imagen: r: %s" % message)
    assert listing(tmp_path) == ["imagen.yaml"] and replicate.api.cancels == []


@pytest.mark.parametrize("status,body,message", [
    (402, {"title": "Insufficient credit", "status": 402,
           "detail": "You have insufficient credit to run this model. Go to "
                     "https://replicate.com/account/billing#billing to buy credit."},
     "HTTP 402 Insufficient credit: You have insufficient credit to run this model."),
    (500, {"detail": "Internal server error", "status": 500}, "HTTP 500: Internal server error"),
])
def test_replicate_create_errors_are_in_replicates_words(replicate, status, body, message):
    replicate.api.script("POST", "/v1/models/", (status, {"Content-Type": "application/problem+json"},
                                                 json.dumps(body)))
    run = replicate.generate("-o", "a.png")
    assert run.code == 1 and message in run.err and run.err.count("\n") == 1
    assert len(replicate.api.creates) == 1         # a 5xx on create is never retried


def test_replicate_401_names_the_variable_never_the_token(replicate):
    replicate.api.token = "r8_another_token"
    run = replicate.generate("-o", "a.png")
    assert run.code == 1
    assert "HTTP 401 Unauthenticated: You did not pass a valid authentication token" in run.err
    assert "$REPLICATE_API_TOKEN" in run.err and REPLICATE_TOKEN not in run.err


def test_replicate_unknown_model_is_404_in_its_words(replicate):
    replicate.configure(model="black-forest-labs/flux-nope")
    run = replicate.generate("-o", "a.png")
    assert run.code == 1
    assert "model black-forest-labs/flux-nope not found: HTTP 404: The requested resource" in run.err


def test_replicate_invalid_input_is_422_in_its_words(replicate):
    replicate.configure(input={"num_inference_steps": 9})
    run = replicate.generate("-o", "a.png")
    assert run.code == 1
    assert ("invalid input for model %s: HTTP 422 Input validation failed: input.num_inference_steps: "
            "Must be less than or equal to 4\n" % SCHNELL) in run.err


def test_fake_refuses_extra_top_level_keys_on_official_routes(replicate):
    import urllib.error
    import urllib.request
    request = urllib.request.Request(
        replicate.api.url + "/models/%s/predictions" % SCHNELL, method="POST",
        data=json.dumps({"version": "x", "input": {"prompt": "p"}}).encode(),
        headers={"Authorization": "Bearer " + REPLICATE_TOKEN, "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=10)
    assert error.value.code == 422 and b"version" in error.value.read()


def test_batch_on_a_replicate_deployment_runs_up_to_its_max_instances_billed_by_time(
        replicate, run_main, tmp_path):
    replicate.api.add_deployment("acme/fast-fox", hardware="gpu-l40s", max_instances=2)
    replicate.api.duration = 0.2
    config = replicate.configure(deployment="acme/fast-fox")
    path = batch_file(tmp_path, "".join("fox %d\n" % i for i in range(5)))
    run = run_main("--config", config, "batch", path, "--size", "64x64", "--json",
                   extra_env=TOKEN_ENV)
    assert run.code == 0, run
    assert len(replicate.api.deployment_creates) == 5
    assert replicate.api.max_running("acme/fast-fox") == 2
    records = [json.loads(line) for line in run.lines]
    assert all(r["cost_usd"] == pytest.approx(r["backend_meta"]["predict_time"] * 0.000975)
               for r in records)
    assert "estimated cost $0.04875" in run.err        # 5 x 10 s x $0.000975
    run = run_main("--config", config, "backends", extra_env=TOKEN_ENV)
    assert "deployment acme/fast-fox on gpu-l40s, 0..2 instances, $0.000975 per second" in run.out


def replicate_call(api, method, path, body=b"", headers=None, auth=True):
    """(status, headers, decoded JSON or bytes) of one request to the fake, by http.client."""
    headers = dict(headers or {})
    if auth:
        headers["Authorization"] = "Bearer " + REPLICATE_TOKEN
    if isinstance(body, dict):
        body, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    status, answer_headers, raw = raw_call(api.server.url, method, path, body, headers)
    kind = answer_headers.get("content-type", "")
    return status, answer_headers, json.loads(raw) if "json" in kind and raw else raw


def test_fake_replicate_files_api_round_trip(replicate):
    import hashlib
    api, data = replicate.api, bytes(range(256)) * 4096 + b"\r\n--tail"      # 1 MiB of any bytes
    kind, body = encode_multipart([("content", ("fox.png", data, "image/png")),
                                   ("metadata", json.dumps({"job": "j1"}))])
    status, _, created = replicate_call(api, "POST", "/v1/files", body, {"Content-Type": kind})
    assert status == 201
    assert {k: created[k] for k in ("name", "content_type", "size", "metadata")} == {
        "name": "fox.png", "content_type": "image/png", "size": len(data), "metadata": {"job": "j1"}}
    assert created["checksums"] == {"sha256": hashlib.sha256(data).hexdigest(),
                                    "md5": hashlib.md5(data).hexdigest()}
    assert re.fullmatch(r"[a-z2-7]{26}", created["id"]) and created["etag"]
    assert created["created_at"] < created["expires_at"]
    get = created["urls"]["get"]
    assert get.startswith(api.url + "/files/%s/download?" % created["id"])
    # the signed URL needs no token; the file object does
    status, headers, body = replicate_call(api, "GET", get[len(api.server.url):], auth=False)
    assert status == 200 and body == data and headers["content-type"] == "image/png"
    assert replicate_call(api, "GET", "/v1/files/" + created["id"], auth=False)[0] == 401
    assert replicate_call(api, "GET", "/v1/files/" + created["id"])[2]["checksums"] == created["checksums"]
    assert [f["id"] for f in replicate_call(api, "GET", "/v1/files")[2]["results"]] == [created["id"]]
    # a prediction that names the file, and a delete before it ends: the fake tells
    api.duration = 30
    replicate_call(api, "POST", "/v1/models/black-forest-labs/flux-dev/predictions",
                   {"input": {"prompt": "p", "image": get}})
    status, _, body = replicate_call(api, "DELETE", "/v1/files/" + created["id"])
    assert status == 204 and body == b""
    assert api.early_deletes() == [created["id"]]
    assert replicate_call(api, "GET", "/v1/files/" + created["id"])[0] == 404
    assert replicate_call(api, "GET", get[len(api.server.url):], auth=False)[0] == 404
    assert replicate_call(api, "DELETE", "/v1/files/" + created["id"])[0] == 404
    assert len(api.file_uploads) == 1 and len(api.file_deletes) == 2
    kind, body = encode_multipart([("metadata", "{}")])
    assert replicate_call(api, "POST", "/v1/files", body, {"Content-Type": kind})[0] == 422


def test_fake_replicate_deployment_runs_predictions_on_its_instances(replicate, fake_clock):
    api = replicate.api
    api.duration = 0.2
    api.add_deployment("acme/fox-fast", hardware="gpu-h100", max_instances=2)
    status, _, deployment = replicate_call(api, "GET", "/v1/deployments/acme/fox-fast")
    assert status == 200 and deployment["owner"] == "acme" and deployment["name"] == "fox-fast"
    release = deployment["current_release"]
    assert release["configuration"] == {"hardware": "gpu-h100", "min_instances": 0, "max_instances": 2}
    assert release["model"] == SCHNELL and release["version"] == FAKE_VERSION
    assert replicate_call(api, "GET", "/v1/deployments/acme/nope")[0] == 404
    path = "/v1/deployments/acme/fox-fast/predictions"
    answers = [replicate_call(api, "POST", path, {"input": {"prompt": "fox %d" % i}}) for i in range(3)]
    assert [status for status, _, _ in answers] == [201] * 3
    made = [prediction for _, _, prediction in answers]
    assert all(p["model"] == SCHNELL and p["version"] == FAKE_VERSION for p in made)
    assert made[2]["status"] == "starting"           # queued: both instances are busy
    assert replicate_call(api, "POST", path, {"version": "x", "input": {}})[0] == 422
    assert len(api.deployment_creates) == 4 and len(api.creates) == 4
    runs = [api.predictions[p["id"]] for p in made]
    assert runs[2]["t0"] >= runs[0]["t0"] + 0.2       # it started when the first one ended

    fake_clock.advance_to(runs[2]["t0"] + 0.2)       # its turn, and its run, are over
    done = replicate_call(api, "GET", "/v1/predictions/" + made[2]["id"])[2]
    assert done["status"] == "succeeded"
    assert done["output"] and done["metrics"]["predict_time"] > 0
    assert api.max_running("acme/fox-fast") == 2 and api.max_running() == 2


def throttled(header=None, body_seconds=None):
    body = {"detail": "Request was throttled. Your rate limit resets in ~1s.", "status": 429}
    if body_seconds is not None:
        body["retry_after"] = body_seconds
    headers = {"Content-Type": "application/problem+json"}
    if header is not None:
        headers["Retry-After"] = header
    return 429, headers, json.dumps(body)


@pytest.mark.parametrize("response,seconds", [(throttled(header="1"), 1.0),
                                              (throttled(body_seconds=0.4), 0.4)],
                         ids=["Retry-After header", "retry_after in the body"])
def test_replicate_create_is_retried_after_429_as_told(replicate, fake_clock, response, seconds):
    replicate.api.script("POST", "/v1/models/", response)
    replicate.record()
    creates = [t for t, r in replicate.api.log if r.method == "POST"]
    assert len(creates) == 2 and len(replicate.api.predictions) == 1
    assert fake_clock.slept[:1] == [seconds]        # what it was told, not its own backoff


def test_replicate_retry_after_header_beats_the_body(replicate, fake_clock):
    replicate.api.script("POST", "/v1/models/", throttled(header="0", body_seconds=30))
    replicate.record()
    assert len(replicate.api.creates) == 2
    assert fake_clock.slept == [0]                  # the header's 0 s, not the body's 30


def test_replicate_polls_are_retried_on_429_and_5xx(replicate, fake_clock):
    replicate.configure(wait=1)
    replicate.api.duration = 1.1
    replicate.api.script("GET", "/v1/predictions/", throttled(header="0"),
                         (503, {}, "upstream unavailable"), (502, {}, ""))
    record = replicate.record()
    assert record["backend_meta"]["status"] == "succeeded"
    assert len(replicate.api.creates) == 1 and len(replicate.api.polls) >= 4


def test_replicate_create_is_not_retried_after_a_read_timeout(replicate, fake_clock, asked):
    # the create's answer begins only after the whole read timeout (the 1 s wait window
    # plus its margin) has gone by on the test's clock, and never ends
    replicate.configure(wait=1)
    replicate.api.duration = 30
    replicate.api.stall_create = 1 + imagen.REPLICATE_READ_MARGIN
    run = replicate.generate("-o", "a.png")
    assert run.code == 1 and "timed out" in run.err
    assert len(replicate.api.creates) == 1
    assert [call.timeout for call in asked if call.method == "POST"][0] \
        == 1 + imagen.REPLICATE_READ_MARGIN
    # its id never arrived: imagen found it among the newest predictions and cancelled it
    assert [r.path for r in replicate.api.cancels] == ["/v1/predictions/fake00000001/cancel"]


def test_replicate_connection_refused_is_retried_then_exit_1(write_config, run_main, fake_clock):
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = write_config("backends:\n  r:\n    adapter: replicate\n    model: %s\n"
                        "    base_url: http://127.0.0.1:%d/v1\n" % (SCHNELL, port))
    run = run_main("--config", path, "generate", "x", "--backend", "r", "--timeout", "3",
                   extra_env=TOKEN_ENV)
    assert run.code == 1 and "connection refused" in run.err
    assert fake_clock.slept         # retried after a backoff


def test_replicate_timeout_cancels_the_prediction(replicate, tmp_path, fake_clock):
    replicate.configure(wait=1)
    replicate.api.duration = 30
    run = replicate.generate("--timeout", "1.5", "-o", "a.png")
    assert run.code == 1 and "timed out waiting for prediction fake00000001" in run.err
    assert [r.path for r in replicate.api.cancels] == ["/v1/predictions/fake00000001/cancel"]
    assert listing(tmp_path) == ["imagen.yaml"]


def interrupt_once_running(replicate, env, tmp_path, polled, signum=signal.SIGINT):
    """Run the CLI, SIGINT it once the fake has the prediction (and a poll, if asked)."""
    proc = popen_imagen(["--config", replicate.path, "generate", "a fox", "-o", tmp_path / "a.png"],
                        env=dict(env, **TOKEN_ENV), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        poll(lambda: replicate.api.predictions, timeout=20, message="the prediction")
        if polled:
            poll(lambda: replicate.api.polls, timeout=20, message="a poll")
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    return proc.returncode, err.decode()


def test_ctrl_c_while_polling_cancels_the_prediction(replicate, env, tmp_path):
    # the create answers at once, still running, so imagen polls within 0.2 s (a held
    # create would cost the test the whole wait window in real time)
    replicate.api.duration, replicate.api.hold_create = 60, 0.01
    code, err = interrupt_once_running(replicate, env, tmp_path, polled=True)
    assert code == 130 and "imagen: interrupted" in err and "Traceback" not in err
    assert [r.path for r in replicate.api.cancels] == ["/v1/predictions/fake00000001/cancel"]
    assert not (tmp_path / "a.png").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_during_the_held_create_finds_and_cancels_the_prediction(
        replicate, env, tmp_path, signum):
    replicate.api.duration = 60
    code, err = interrupt_once_running(replicate, env, tmp_path, polled=False, signum=signum)
    assert code == 130 and "Traceback" not in err
    assert replicate.api.requests_to("GET", "/v1/predictions")      # looked it up
    assert [r.path for r in replicate.api.cancels] == ["/v1/predictions/fake00000001/cancel"]
    assert replicate.api.get("fake00000001")[2]["status"] == "canceled"


@pytest.mark.parametrize("token", [None, "", "  "])
def test_replicate_missing_token_is_exit_2_before_any_request(replicate, token):
    run = replicate.generate("-o", "a.png", token=token)
    assert run.code == 2
    assert run.err == ("imagen: r: $REPLICATE_API_TOKEN is not set: it must hold your "
                       "Replicate API token\n")
    assert replicate.api.log == []


def test_replicate_token_comes_from_the_variable_the_block_names(replicate):
    replicate.configure(api_token_env="MY_R8_TOKEN")
    run = replicate.generate("-o", "a.png")
    assert run.code == 2 and "$MY_R8_TOKEN is not set" in run.err
    run = replicate.generate("-o", "a.png", token=None, extra_env={"MY_R8_TOKEN": REPLICATE_TOKEN})
    assert run.code == 0, run


def test_replicate_token_with_a_newline_inside_is_refused_without_showing_it(replicate):
    run = replicate.generate("-o", "a.png", token="r8_abc\nr8_def")
    assert run.code == 2 and "spaces or control characters" in run.err and "r8_abc" not in run.err


def test_backends_shows_replicate_not_usable_without_its_token_and_its_price(replicate, run_main):
    run = run_main("--config", replicate.path, "backends")
    row = next(line for line in run.lines if " r " in line)
    assert "not usable: $REPLICATE_API_TOKEN is not set" in row
    assert "$0.003 per image (prices of 2026-05)" in row
    run = run_main("--config", replicate.path, "backends", "--json", extra_env=TOKEN_ENV)
    rows = {b["name"]: b for b in json.loads(run.out)["backends"]}
    assert rows["r"]["usable"] is True and rows["r"]["price"].startswith("$0.003 per image")
    assert rows["mock"]["price"] is None and "replicate" in json.loads(run.out)["adapters"]


def test_backends_shows_hardware_price_or_unknown(replicate, run_main):
    replicate.configure(model="acme/sdxl-like:" + FAKE_VERSION, hardware="a40")
    assert "$0.000575 per second on a40" in run_main("--config", replicate.path, "backends").out
    replicate.configure(model="acme/sdxl-like:" + FAKE_VERSION)
    assert "price unknown" in run_main("--config", replicate.path, "backends").out


def test_replicate_time_billed_cost_is_predict_time_times_hardware_price(replicate, fake_clock):
    replicate.configure(model="acme/sdxl-like:" + FAKE_VERSION, hardware="a40")
    replicate.api.duration = 0.2
    record = replicate.record()
    assert record["cost_usd"] == pytest.approx(0.2 * 0.000575, rel=0.1)


def test_replicate_time_billed_prediction_of_several_images_splits_its_cost(replicate):
    """One prediction made both images: its compute time is billed once, so each record
    carries half of it, and the ledger's sum is what Replicate charged."""
    replicate.configure(model="acme/sdxl-like:" + FAKE_VERSION, family="flux-dev",
                        hardware="a40")
    replicate.api.override = {"metrics": {"predict_time": 4.0, "total_time": 4.5}}
    run = replicate.generate("--count", "2", "--json", "-o", "out/fox.png")
    assert run.code == 0, run
    (create,) = replicate.api.creates
    assert sent_input(create)["num_outputs"] == 2
    records = [json.loads(line) for line in run.lines]
    assert [record["cost_usd"] for record in records] == [pytest.approx(4.0 * 0.000575 / 2)] * 2


def test_replicate_token_never_leaks_into_output_files_ledger_or_tracebacks(replicate, tmp_path):
    run = replicate.generate("--count", "2", "--json", "-o", "out/fox.png")
    seen = run.out + run.err
    replicate.api.token = "r8_something_else"
    for debug in ("0", "1"):
        run = replicate.generate("-o", "b.png", extra_env={"IMAGEN_DEBUG": debug})
        assert run.code == 1
        seen += run.out + run.err
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.name == "fox-2.png.json" for path in files)
    assert any(path.suffix == ".db" for path in files)        # the ledger
    for path in files:
        seen += path.read_bytes().decode("latin-1")
    assert "Traceback" in seen and REPLICATE_TOKEN not in seen


@pytest.mark.parametrize("variable", ["REPLICATE_API_TOKEN", "R8_CREDENTIAL"])
def test_replicate_token_echoed_by_the_server_is_scrubbed_from_everything_kept(
        replicate, tmp_path, variable):
    # a name without TOKEN/KEY in it: only the adapter knows that it holds a secret
    replicate.configure(api_token_env=variable)
    replicate.api.echo = REPLICATE_TOKEN
    run = replicate.generate("--json", "-o", "out/fox.png", token=None,
                             extra_env={variable: REPLICATE_TOKEN})
    assert run.code == 0, run
    record = json.loads(run.lines[0])
    assert record["backend_meta"]["prediction_id"] == "pid-[redacted]-00000001"
    seen = run.out + run.err
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert {"fox.png", "fox.png.json"} <= {path.name for path in files}
    assert any(path.suffix == ".db" for path in files)        # the ledger
    for path in files:
        seen += path.read_bytes().decode("latin-1")
    assert "pid-[redacted]-00000001" in seen and REPLICATE_TOKEN not in seen


def test_replicate_progress_on_a_terminal_never_shows_an_echoed_token(replicate, env, tmp_path):
    import io
    replicate.api.echo = REPLICATE_TOKEN
    stream = io.StringIO()
    console = imagen.Console(stream=stream)
    console.live = True                     # as on a terminal
    imagen.generate("a fox", config=imagen.load_config(str(replicate.path), env),
                    env=dict(env, **TOKEN_ENV), console=console, output=str(tmp_path / "a.png"))
    assert "r: pid-***-00000001 succeeded" in stream.getvalue()
    assert "downloading http://127.0.0.1:" in stream.getvalue()
    assert REPLICATE_TOKEN not in stream.getvalue()


def test_replicate_count_uses_num_outputs_in_batches_of_four(replicate, tmp_path):
    run = replicate.generate("--count", "6", "--seed", "100", "--json", "-o", "o/a.png")
    records = [json.loads(line) for line in run.lines]
    first, second = replicate.api.creates
    assert (sent_input(first)["num_outputs"], sent_input(first)["seed"]) == (4, 100)
    assert (sent_input(second)["num_outputs"], sent_input(second)["seed"]) == (2, 104)
    assert [r["seed"] for r in records] == [100] * 4 + [104] * 2
    assert [r["backend_meta"]["output_index"] for r in records] == [0, 1, 2, 3, 0, 1]
    assert len(listing(tmp_path / "o")) == 12


def test_replicate_count_without_num_outputs_runs_one_prediction_per_image(replicate):
    replicate.configure(model="black-forest-labs/flux-1.1-pro")
    run = replicate.generate("--count", "3", "--seed", "7", "--json")
    assert [sent_input(c)["seed"] for c in replicate.api.creates] == [7, 8, 9]
    assert all("num_outputs" not in sent_input(c) for c in replicate.api.creates)
    assert [json.loads(line)["seed"] for line in run.lines] == [7, 8, 9]


@pytest.mark.parametrize("backend,message", [("replicate", "made 1 of 3 images"),
                                              ("openai", "the answer holds 1 of 3 images")])
def test_fewer_outputs_than_asked_keeps_the_ones_made_and_exits_1(request, backend, message,
                                                                   tmp_path):
    harness = request.getfixturevalue(backend)
    harness.api.made = 1
    run = harness.generate("--count", "3", "-o", "o/a.png")
    assert run.code == 1 and message in run.err
    assert listing(tmp_path / "o") == ["a.png", "a.png.json"]


@pytest.mark.parametrize("backend,model,flags,limit,estimate", [
    ("replicate", "black-forest-labs/flux-dev", ["--count", "4"], "0.05",
     "r: estimated cost $0.10 for 4 image(s) of black-forest-labs/flux-dev"),
    # openai prices dall-e-3 by size: 1792x1024 is dearer than the default 1024x1024
    ("openai", "dall-e-3", ["--count", "2", "--size", "1792x1024"], "0.10",
     "o: estimated cost $0.16 for 2 image(s) of dall-e-3")])
def test_max_cost_refuses_before_submitting_with_the_estimate(request, backend, model, flags,
                                                              limit, estimate):
    harness = request.getfixturevalue(backend)
    harness.configure(model=model)
    run = harness.generate(*flags, "--max-cost", limit, "-o", "a.png")
    assert run.code == 2 and harness.api.log == []
    assert run.err == "imagen: %s is over --max-cost $%s; nothing was submitted\n" % (
        estimate, limit)
    assert harness.generate("--count", "2", "--max-cost", limit, "-o", "a.png").code == 0


def test_max_cost_usd_in_the_block_guards_too_and_the_flag_wins(replicate):
    replicate.configure(model="black-forest-labs/flux-pro", max_cost_usd=0.05)
    run = replicate.generate("-o", "a.png")
    assert run.code == 2 and "$0.055 for 1 image(s)" in run.err
    assert "is over backends.r.max_cost_usd $0.05;" in run.err
    assert replicate.api.log == []
    assert replicate.generate("-o", "a.png", "--max-cost", "0.1").code == 0


@pytest.mark.parametrize("amount,text", [(0.1, "0.10"), (0.003, "0.003"), (2, "2.00"),
                                         (0.0575, "0.0575"), (0, "0.00")])
def test_dollars_show_cents_and_any_smaller_digits(amount, text):
    assert imagen.dollars(amount) == text


def test_max_cost_with_an_unknown_price_refuses(replicate):
    replicate.configure(model="acme/sdxl-like:" + FAKE_VERSION)
    run = replicate.generate("--max-cost", "1", "-o", "a.png")
    assert run.code == 2 and "the cost of acme/sdxl-like:%s is unknown" % FAKE_VERSION in run.err
    assert replicate.api.log == []


def test_max_cost_does_not_stop_free_backends_and_must_not_be_negative(run_main):
    assert run_main("generate", "x", "--max-cost", "0", "-o", "a.png").code == 0
    run = run_main("generate", "x", "--max-cost", "-1", "-o", "a.png")
    assert run.code == 2 and "--max-cost must be a number of US dollars" in run.err


@pytest.mark.parametrize("block,where,message", [
    ("model: flux-dev", "backends.r.model", "must be owner/name or owner/name:version"),
    ("model: a/b\n    wait: 90", "backends.r.wait", "must be a whole number from 1 to 60"),
    ("model: a/b\n    base_url: ftp://x", "backends.r.base_url", "must be an http"),
    ("model: a/b\n    hardware: tpu", "backends.r.hardware", "must be one of cpu, t4"),
    ("wait: 5", "backends.r.model", "missing (the replicate adapter needs it)"),
])
def test_replicate_block_problems_are_config_errors(run_main, write_config, block, where, message):
    path = write_config("backends:\n  r:\n    adapter: replicate\n    %s\n" % block)
    run = run_main("--config", path, "config", "validate")
    assert run.code == 2 and where in run.err and message in run.err


@pytest.mark.parametrize("ref,family", [
    ("black-forest-labs/flux-schnell", "flux-schnell"), ("black-forest-labs/flux-dev", "flux-dev"),
    ("black-forest-labs/flux-dev-lora", "flux-dev"), ("black-forest-labs/flux-pro", "flux-pro"),
    ("black-forest-labs/flux-1.1-pro", "flux-1.1-pro"),
    ("black-forest-labs/flux-1.1-pro-ultra", "flux-1.1-pro-ultra"),
    ("someone/my-flux-style:abc123", "generic"), ("stability-ai/sdxl", "generic"),
])
def test_model_family_comes_from_the_model_name(ref, family):
    assert imagen.model_family(ref) == family


def test_sample_config_has_a_replicate_backend(run_main):
    run = run_main("--config", os.path.join(HERE, "imagen.sample.yaml"), "backends", "--json")
    rows = {b["name"]: b for b in json.loads(run.out)["backends"]}
    assert rows["flux-dev-replicate"]["adapter"] == "replicate"


# ----- image input: fields per model family, data: URIs, the files API -----

def test_replicate_sends_input_images_in_each_familys_own_field(replicate, tmp_path):
    small = solid_png(300, 200)
    (tmp_path / "in.png").write_bytes(small)
    uri = "data:image/png;base64," + __import__("base64").b64encode(small).decode()
    cases = [("black-forest-labs/flux-kontext-pro", {}, {"input_image": uri,
                                                        "aspect_ratio": "match_input_image"}),
             ("black-forest-labs/flux-2-pro", {}, {"input_images": [uri, uri],
                                                  "aspect_ratio": "match_input_image"}),
             ("black-forest-labs/flux-dev", {}, {"image": uri, "prompt_strength": 0.6}),
             ("black-forest-labs/flux-1.1-pro", {}, {"image_prompt": uri}),
             ("black-forest-labs/flux-schnell", {"image_field": "image", "strength_field": "s"},
              {"image": uri, "s": 0.6})]
    for model, block, wanted in cases:
        replicate.configure(model=model, **block)
        images = ["-i", "in.png", "-i", "in.png"] if "flux-2" in model else ["-i", "in.png"]
        run = replicate.generate("-o", "out.png", "--json", "--strength", "0.6", *images)
        sent = sent_input(replicate.api.creates[-1])
        assert {key: sent.get(key) for key in wanted} == wanted, (model, run)
        record = json.loads(run.out) if run.code == 0 else None
        if model.endswith("flux-schnell"):
            assert run.code == 1 and "Additional property image is not allowed" in run.err
            continue                        # the fake's flux-schnell has no image input: 422
        assert run.code == 0, (model, run)
        assert "data:" not in json.dumps(record) and record["inputs"][0]["width"] == 300
        if "ignores --strength" not in run.err:
            assert "prompt_strength" in sent or "s" in sent
    assert replicate.api.file_uploads == []               # all under 256 KiB: data: URIs


def test_replicate_backend_without_image_input_is_exit_2_before_any_request(replicate, tmp_path):
    (tmp_path / "in.png").write_bytes(solid_png(64, 64))
    run = replicate.generate("-o", "out.png", "-i", "in.png")        # flux-schnell
    assert run.code == 2 and "backend r takes no input images" in run.err
    replicate.configure(model="black-forest-labs/flux-kontext-pro")
    run = replicate.generate("-o", "out.png", "-i", "in.png", "-i", "in.png")
    assert run.code == 2 and "backend r takes at most 1 input image; 2 given" in run.err
    run = replicate.generate("-o", "out.png", "-i", "missing.png")
    assert run.code == 2 and "--image missing.png" in run.err
    assert replicate.api.log == [] and not (tmp_path / "out.png").exists()


def test_replicate_large_input_is_uploaded_once_and_deleted_when_the_prediction_ends(
        replicate, tmp_path):
    big = padded_png(solid_png(320, 240), 1024 * 1024)
    (tmp_path / "big.png").write_bytes(big)
    replicate.configure(model="black-forest-labs/flux-dev")
    record = replicate.record("-i", "big.png", "--count", "6")    # two predictions of 4 + 2
    api = replicate.api
    assert len(api.creates) == 2 and len(api.file_uploads) == 1 and len(api.file_deletes) == 1
    form = imagen_form(api.file_uploads[0])
    assert form.get("content").data == big and form.get("content").content_type == "image/png"
    (ident,) = api.deleted_files
    assert all(sent_input(create)["image"].startswith(api.url + "/files/" + ident)
               for create in api.creates)
    assert api.early_deletes() == [] and api.files == {}
    assert record["backend_meta"]["input"]["image"] == "sha256:" + record["inputs"][0]["sha256"][:16]
    assert "signature" not in json.dumps(record)


def imagen_form(request):
    from conftest import parse_multipart
    return parse_multipart(request.headers.get("content-type"), request.body)


def test_replicate_uploaded_input_is_deleted_after_a_failure_or_a_timeout(replicate, tmp_path,
                                                                         fake_clock):
    (tmp_path / "big.png").write_bytes(padded_png(solid_png(64, 64), 300 * 1024))
    replicate.configure(model="black-forest-labs/flux-kontext-pro", wait=1)
    replicate.api.outcome, replicate.api.error = "failed", "NSFW"
    run = replicate.generate("-o", "a.png", "-i", "big.png")
    assert run.code == 1 and "NSFW" in run.err
    assert len(replicate.api.file_deletes) == 1 and replicate.api.early_deletes() == []
    replicate.api.outcome, replicate.api.duration = "succeeded", 30
    run = replicate.generate("--timeout", "1.5", "-o", "a.png", "-i", "big.png")
    assert run.code == 1 and "timed out" in run.err
    assert len(replicate.api.cancels) == 1 and len(replicate.api.file_deletes) == 2
    assert replicate.api.early_deletes() == [] and replicate.api.files == {}


def test_replicate_ctrl_c_cancels_then_deletes_the_uploaded_input(replicate, env, tmp_path):
    (tmp_path / "big.png").write_bytes(padded_png(solid_png(64, 64), 300 * 1024))
    replicate.configure(model="black-forest-labs/flux-kontext-pro")
    replicate.api.duration = 60
    proc = popen_imagen(["--config", replicate.path, "generate", "a fox", "-i",
                         tmp_path / "big.png", "-o", tmp_path / "a.png"],
                        env=dict(env, **TOKEN_ENV), stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE)
    try:
        poll(lambda: replicate.api.predictions, timeout=20, message="the prediction")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 130 and b"Traceback" not in err
    assert len(replicate.api.cancels) == 1 and len(replicate.api.file_deletes) == 1
    assert replicate.api.early_deletes() == [] and replicate.api.files == {}


def test_replicate_failed_upload_is_exit_1_naming_the_file_and_the_host(replicate, tmp_path):
    from conftest import problem
    (tmp_path / "big.png").write_bytes(padded_png(solid_png(64, 64), 300 * 1024))
    replicate.configure(model="black-forest-labs/flux-kontext-pro")
    replicate.api.script("POST", "/v1/files", problem(413, "File too large"))
    run = replicate.generate("-o", "a.png", "-i", "big.png")
    assert run.code == 1 and str(tmp_path / "big.png") in run.err
    assert replicate.api.url in run.err and "File too large" in run.err
    assert replicate.api.creates == [] and not (tmp_path / "a.png").exists()


def test_replicate_prices_kontext_per_image_and_flux_2_per_megapixel(replicate, tmp_path):
    (tmp_path / "in.png").write_bytes(solid_png(64, 64))
    replicate.configure(model="black-forest-labs/flux-kontext-max")
    assert replicate.record("-i", "in.png")["cost_usd"] == 0.08
    replicate.configure(model="black-forest-labs/flux-2-pro")
    # 1 MP out (1024x1024), two inputs of at least 1 MP each: 3 x $0.015
    record = replicate.record("-i", "in.png", "-i", "in.png", "--size", "1024x1024")
    assert record["cost_usd"] == pytest.approx(0.045)


# ===== OpenAI adapter (against the fake in conftest.py) =====

from conftest import OPENAI_KEY  # noqa: E402

KEY_ENV = {"OPENAI_API_KEY": OPENAI_KEY}


@pytest.fixture
def openai(openai_api, write_config, run_main):
    """The fake API plus `configure(**block)` and `generate(*flags)` that talk to it."""
    class Harness:
        api = openai_api

        def configure(self, model="gpt-image-1.5", extra="", **block):
            lines = ["default_backend: o", "backends:", "  o:", "    adapter: openai",
                     "    model: %s" % model, "    base_url: %s" % openai_api.url]
            lines += ["    %s: %s" % (key, json.dumps(value)) for key, value in block.items()]
            self.path = write_config("\n".join(lines) + "\n" + extra)
            return self.path

        def generate(self, *flags, key=OPENAI_KEY, extra_env=None, prompt="a red fox"):
            env = dict({"OPENAI_API_KEY": key} if key is not None else {}, **(extra_env or {}))
            return run_main("--config", self.path, "generate", prompt, *flags, extra_env=env)

        def records(self, *flags):
            run = self.generate("--json", "-o", "out/fox.png", *flags)
            assert run.code == 0, run
            return [json.loads(line) for line in run.lines]

        def record(self, *flags):
            (record,) = self.records(*flags)
            return record

    harness = Harness()
    harness.configure()
    return harness


def test_openai_text_is_one_json_post_to_images_generations_priced_from_usage(openai, tmp_path):
    record = openai.record()
    (create,) = openai.api.creates
    assert create.path == "/v1/images/generations"
    assert create.headers["authorization"] == "Bearer " + OPENAI_KEY
    assert create.headers["content-type"] == "application/json"
    assert create.json() == {"model": "gpt-image-1.5", "prompt": "a red fox", "n": 1,
                             "size": "1024x1024"}
    assert png_size((tmp_path / "out" / "fox.png").read_bytes()) == (1024, 1024)
    assert (record["adapter"], record["model"], record["mime_type"]) == (
        "openai", "gpt-image-1.5", "image/png")
    assert record["seed"] is None and record["steps"] == 0
    # 3 text tokens at $5/1M and 4160 image output tokens (high) at $32/1M
    assert record["cost_usd"] == pytest.approx((3 * 5.0 + 4160 * 32.0) / 1e6)
    meta = record["backend_meta"]
    assert meta["request_id"] == "req_%032x" % 1 and meta["cost_from"] == "usage"
    assert (meta["quality"], meta["size"], meta["output_format"]) == ("high", "1024x1024", "png")
    assert meta["usage"]["output_tokens"] == 4160 and meta["input"]["n"] == 1


def test_openai_sends_organization_and_project_from_the_variables_the_block_names(openai):
    openai.configure(organization_env="MY_ORG", project_env="MY_PROJECT")
    run = openai.generate("-o", "a.png")
    assert run.code == 2 and run.err == (
        "imagen: o: $MY_ORG is not set: it must hold the organization id\n")
    assert openai.api.log == []
    run = openai.generate("-o", "a.png", extra_env={"MY_ORG": "org-abc", "MY_PROJECT": "proj_1"})
    assert run.code == 0, run
    (create,) = openai.api.creates
    assert create.headers["openai-organization"] == "org-abc"
    assert create.headers["openai-project"] == "proj_1"


@pytest.mark.parametrize("model,size,sent", [
    ("gpt-image-1.5", "1024x1024", "1024x1024"), ("gpt-image-1.5", "1920x1080", "1536x1024"),
    ("gpt-image-1", "768x1344", "1024x1536"), ("gpt-image-1-mini", "512x512", "1024x1024"),
    ("dall-e-3", "1536x640", "1792x1024"), ("dall-e-3", "900x1000", "1024x1024"),
    ("dall-e-2", "300x200", "256x256"), ("dall-e-2", "700x700", "512x512"),
])
def test_openai_size_maps_to_the_nearest_offered_and_the_real_size_is_read_back(
        openai, model, size, sent):
    openai.configure(model=model)
    record = openai.record("--size", size)
    assert openai.api.creates[0].json()["size"] == sent
    assert record["requested_size"] == size
    assert "%dx%d" % (record["width"], record["height"]) == sent


def test_openai_count_is_n_up_to_the_models_most_and_the_cost_is_split(openai):
    records = openai.records("--count", "12")
    assert [c.json()["n"] for c in openai.api.creates] == [10, 2]
    per_image = (3 * 5.0 + 10 * 4160 * 32.0) / 1e6 / 10
    assert [r["cost_usd"] for r in records[:10]] == [pytest.approx(per_image)] * 10
    assert [r["backend_meta"]["output_index"] for r in records] == list(range(10)) + [0, 1]
    assert len({r["backend_meta"]["request_id"] for r in records}) == 2


def test_openai_dall_e_3_makes_one_image_a_request(openai):
    openai.configure(model="dall-e-3")
    records = openai.records("--count", "3")
    assert [c.json()["n"] for c in openai.api.creates] == [1, 1, 1]
    assert [r["cost_usd"] for r in records] == [0.04] * 3


def test_openai_dall_e_url_is_fetched_without_the_key_and_its_revised_prompt_kept(openai):
    openai.configure(model="dall-e-3", input={"quality": "hd"})
    record = openai.record("--size", "1792x1024")
    (blob,) = openai.api.blob_requests
    assert "authorization" not in blob.headers and OPENAI_KEY not in str(blob.headers)
    assert not any(h.startswith("openai-") for h in blob.headers)
    assert record["backend_meta"]["revised_prompt"] == "A detailed illustration of a red fox"
    assert record["cost_usd"] == 0.12 and record["backend_meta"]["cost_from"] == "per-image price"
    assert (record["width"], record["height"]) == (1792, 1024)


def test_openai_b64_json_from_dall_e_is_decoded_too(openai):
    openai.configure(model="dall-e-2", input={"response_format": "b64_json"})
    record = openai.record("--size", "256x256")
    assert openai.api.blob_requests == [] and record["cost_usd"] == 0.016


def test_openai_block_input_is_passed_through_and_the_mime_type_comes_from_the_bytes(openai):
    openai.configure(input={"quality": "low", "background": "transparent",
                            "output_format": "jpeg", "moderation": "low", "n": 5,
                            "prompt": "not this"})
    record = openai.record("--size", "1536x1024")
    assert openai.api.creates[0].json() == {
        "model": "gpt-image-1.5", "prompt": "a red fox", "n": 1, "size": "1536x1024",
        "quality": "low", "background": "transparent", "output_format": "jpeg",
        "moderation": "low"}
    assert record["mime_type"] == "image/jpeg" and record["path"].endswith("fox.png")
    assert record["cost_usd"] == pytest.approx((3 * 5.0 + 408 * 32.0) / 1e6)


def test_openai_has_no_seed_so_names_say_noseed_and_a_given_seed_is_one_warning(
        openai, run_main, env, tmp_path):
    openai.configure(extra="output:\n  dir: %s\n  naming: \"{slug}-{seed}.{ext}\"\n" % tmp_path)
    run = openai.generate("--seed", "42", "--json", "--count", "2", "--steps", "9",
                          "--negative", "blur")
    assert run.code == 0, run
    assert run.err.splitlines() == [
        "imagen: o: gpt-image-1.5 takes no seed: --seed is ignored and the record's seed is null",
        "imagen: o: gpt-image-1.5 has no negative prompt; it is ignored",
        "imagen: o: gpt-image-1.5 has no steps; --steps is ignored"]
    first, second = (json.loads(line) for line in run.lines)
    assert os.path.basename(first["path"]) == "a-red-fox-noseed.png"
    assert os.path.basename(second["path"]) == "a-red-fox-noseed-2.png"
    assert [row["seed"] for row in ledger_rows(env)] == [None, None]
    assert "seed" not in openai.api.creates[0].json()
    assert imagen.read_metadata(first["path"])["embedded"]["seed"] is None
    data = (tmp_path / "a-red-fox-noseed.png").read_bytes()
    text = data[data.index(b"tEXtparameters") + 15:].split(b"IEND")[0]
    assert b"Steps: 0, Size: 1024x1024, Model: gpt-image-1.5" in text and b"Seed" not in text
    assert run_main("--config", openai.path, "usage", "--local").code == 0


def test_openai_null_seed_and_cost_reach_the_usage_and_cloud_rows(openai, supabase, env):
    openai.configure(extra='owner_user_id: "%s"\noutput:\n  cloud_sync: "on"\n' % OWNER_ID)
    run = openai.generate("--json", "-o", "a.png", extra_env=supabase.env)
    assert run.code == 0 and run.err == "", run
    record = json.loads(run.out)
    [image] = supabase.rows("imagen.images")
    [usage] = supabase.rows("mai.imagen_usage")
    assert image["seed"] is None and image["sidecar"]["seed"] is None
    assert usage["cost_usd"] == record["cost_usd"] == image["cost_usd"]
    assert usage["model"] == "gpt-image-1.5" and ledger_rows(env)[0]["cloud"] == "synced"


@pytest.mark.parametrize("prompt,model,message", [
    ("a forbidden fox", "gpt-image-1.5", "refused by OpenAI's moderation (moderation_blocked): "
     "Your request was rejected by the safety system."),
    ("a forbidden fox", "dall-e-3", "refused by OpenAI's moderation (content_policy_violation): "
     "Your request was rejected as a result of our safety system."),
    ("a red fox", "gpt-image-9", "HTTP 400 invalid_value for parameter 'model': "
     "Invalid value: 'gpt-image-9'."),
])
def test_openai_errors_are_in_openais_words_with_code_and_parameter(openai, prompt, model,
                                                                    message):
    openai.configure(model=model)
    run = openai.generate("-o", "a.png", prompt=prompt)
    assert run.code == 1 and message in run.err and "(request req_" in run.err
    assert len(openai.api.creates) == 1


def test_openai_bad_parameter_from_the_block_names_the_parameter(openai):
    openai.configure(input={"style": "vivid"})
    run = openai.generate("-o", "a.png")
    assert run.code == 1
    assert run.err == ("imagen: o: HTTP 400 unknown_parameter for parameter 'style': Unknown "
                       "parameter: 'style'. (request req_%032x)\n" % 1)


def test_openai_401_names_the_variable_never_the_key(openai):
    wrong = "sk-proj-WrongKey0123456789abcdef"
    run = openai.generate("-o", "a.png", key=wrong)
    assert run.code == 1 and "HTTP 401 invalid_api_key: Incorrect API key provided" in run.err
    assert "(check $OPENAI_API_KEY)" in run.err and "0123" not in run.err
    assert "WrongK" not in run.err and "cdef" not in run.err


@pytest.mark.parametrize("key", [None, "", "  "])
def test_openai_missing_key_is_exit_2_before_any_request(openai, key):
    run = openai.generate("-o", "a.png", key=key)
    assert run.code == 2 and run.err == (
        "imagen: o: $OPENAI_API_KEY is not set: it must hold your OpenAI API key\n")
    assert openai.api.log == []


def test_openai_key_comes_from_the_variable_the_block_names_and_never_leaks(openai, tmp_path):
    openai.configure(model="dall-e-3", api_key_env="MY_OPENAI")
    openai.api.echo = OPENAI_KEY                  # the server quotes the key back
    run = openai.generate("--json", "-o", "out/fox.png", key=None,
                          extra_env={"MY_OPENAI": OPENAI_KEY})
    assert run.code == 0, run
    assert json.loads(run.out)["backend_meta"]["revised_prompt"].endswith("[redacted]")
    seen = run.out + run.err
    for path in tmp_path.rglob("*"):
        if path.is_file():
            seen += path.read_bytes().decode("latin-1")
    assert "fox.png.json" in str(list(tmp_path.rglob("*"))) and OPENAI_KEY not in seen
    run = openai.generate("-o", "a.png", key=None, extra_env={"MY_OPENAI": "sk-bad\nkey"})
    assert run.code == 2 and "spaces or control characters" in run.err and "bad" not in run.err


def rate_limited(code="rate_limit_exceeded", ms=None, seconds=None, status=429):
    headers = {}
    if ms is not None:
        headers["retry-after-ms"] = ms
    if seconds is not None:
        headers["retry-after"] = seconds
    return status, headers, {"error": {"message": "Rate limit reached for images per min.",
                                       "type": "requests", "param": None, "code": code}}


def test_openai_429_and_5xx_answers_are_retried_honouring_retry_after_ms(openai, fake_clock):
    openai.api.script("POST", "/v1/images/", rate_limited(ms="150", seconds="30"),
                      (500, {}, {"error": {"message": "The server had an error", "type":
                                           "server_error", "param": None, "code": None}}),
                      (503, {}, "<html>Service Unavailable</html>"))
    record = openai.record()
    times = [t for t, r in openai.api.log]      # on the test's clock
    assert len(times) == 4 and times[1] - times[0] >= 0.14
    assert fake_clock.slept[0] == 0.15              # retry-after-ms, not retry-after's 30 s
    assert record["backend_meta"]["request_id"] == "req_%032x" % 4


def test_openai_insufficient_quota_is_not_retried(openai):
    openai.api.script("POST", "/v1/images/", rate_limited(code="insufficient_quota", seconds="0"))
    run = openai.generate("-o", "a.png")
    assert run.code == 1 and "HTTP 429 insufficient_quota" in run.err
    assert "waiting does not help" in run.err and len(openai.api.creates) == 1


def test_openai_create_is_never_sent_again_when_the_connection_drops_after_the_body(openai):
    openai.api.drop = True
    run = openai.generate("-o", "a.png")
    assert run.code == 1 and len(openai.api.creates) == 1
    assert ("without an answer it is unknown whether images were made (and billed); the "
            "request is not sent again") in run.err


def test_openai_timeout_bounds_the_request_and_it_is_never_sent_again(openai, tmp_path,
                                                                     fake_clock, asked):
    from conftest import Stall
    openai.api.script("POST", "/v1/images/", Stall(5))     # a model slower than the timeout
    run = openai.generate("--timeout", "0.5", "-o", "a.png")
    (create,) = [call for call in asked if call.method == "POST"]
    assert create.deadline <= create.at + 0.5          # the request had the timeout, no more
    assert run.code == 1 and "timed out" in run.err and "not sent again" in run.err
    assert len(openai.api.creates) == 1 and listing(tmp_path) == ["imagen.yaml"]


def test_openai_default_timeout_is_180_seconds(openai, env):
    config = imagen.load_config(str(openai.path), env)
    assert imagen.resolve_job(config, env, prompt="x").timeout == 180.0
    assert imagen.resolve_job(config, env, prompt="x", timeout=7).timeout == 7


@pytest.mark.parametrize("answer,message", [
    ({"created": 1, "data": [{"b64_json": "not base64!"}]}, "b64_json is not valid base64"),
    ({"created": 1, "data": [{}]}, "has neither b64_json nor url"),
    ({"created": 1, "data": []}, "the answer holds no images"),
    ({"created": 1, "data": [{"b64_json": "PGh0bWw+"}]}, "image 1 of the answer: "),
    ([1, 2], "the answer is not a JSON object"),
])
def test_openai_odd_answers_are_a_backend_error(openai, answer, message):
    openai.api.script("POST", "/v1/images/", (200, {}, answer))
    run = openai.generate("-o", "a.png")
    assert run.code == 1 and message in run.err, run


def test_openai_max_cost_estimates_gpt_image_by_size_and_quality_before_any_request(openai):
    openai.configure(model="gpt-image-1-mini", max_cost_usd=0.05)
    run = openai.generate("-o", "a.png", "--size", "1024x1536")      # auto is priced as high
    assert run.code == 2 and "$0.052 for 1 image(s)" in run.err
    openai.configure(model="gpt-image-1-mini", max_cost_usd=0.05, input={"quality": "medium"})
    assert openai.generate("-o", "a.png").code == 0


def test_backends_shows_openai_model_whether_the_key_is_set_and_its_prices(openai, run_main):
    run = run_main("--config", openai.path, "backends")
    row = next(line for line in run.lines if " o " in line)
    assert "openai" in row and "gpt-image-1.5" in row
    assert "not usable: $OPENAI_API_KEY is not set" in row
    assert "$5.00/$8.00/$32.00 per 1M text-in/image-in/image-out tokens (prices of 2026-12-02)" \
        in row
    run = run_main("--config", openai.path, "backends", "--json", extra_env=KEY_ENV)
    rows = {b["name"]: b for b in json.loads(run.out)["backends"]}
    assert rows["o"]["usable"] is True and rows["o"]["note"] == "$OPENAI_API_KEY is set"
    assert "openai" in json.loads(run.out)["adapters"]
    assert rows["o"]["images"] == 8         # gpt-image takes 16 on /images/edits; imagen sends 8
    openai.configure(model="dall-e-3")
    assert "$0.04-0.12 per image" in run_main("--config", openai.path, "backends").out
    run = run_main("--config", openai.path, "backends", "--json")
    assert {b["name"]: b["images"] for b in json.loads(run.out)["backends"]}["o"] == 0


def test_config_validate_knows_the_openai_models_sizes_and_options(run_main, write_config):
    path = write_config(
        "backends:\n"
        "  a:\n    adapter: openai\n    model: gpt-image-1.5\n    size: 1000x700\n"
        "    input: {quality: hd, qualty: low, n: 3, output_compression: 300}\n"
        "  b:\n    adapter: openai\n    model: dall-e-3\n    input: {background: opaque}\n"
        "  c:\n    adapter: openai\n    model: my-local-model\n"
        "    base_url: http://127.0.0.1:1/v1\n"
        "  d:\n    adapter: openai\n    model: gpt-image-1-mini\n"
        "    input: {quality: medium, background: transparent}\n")
    run = run_main("--config", path, "config", "validate")
    assert run.code == 0, run
    warnings = [line[line.index(" backends.") + 1:] for line in run.err.splitlines()]
    assert warnings == [
        "backends.a.size: gpt-image-1.5 offers 1024x1024, 1536x1024, 1024x1536; "
        "1000x700 becomes 1536x1024",
        "backends.a.input.quality: gpt-image-1.5 takes low, medium, high, auto",
        'backends.a.input.qualty: gpt-image-1.5 has no option \'qualty\' (did you mean "quality"?)',
        "backends.a.input.n: set by imagen from the command; this one is ignored",
        "backends.a.input.output_compression: must be a whole number from 0 to 100",
        "backends.b.input.background: dall-e-3 has no option 'background'",
        "backends.c.model: unknown model 'my-local-model' (known: gpt-image-1, gpt-image-1-mini, "
        "gpt-image-1.5, chatgpt-image-latest, dall-e-3, dall-e-2): its sizes and options are "
        "not checked and its price is unknown"]
    run = run_main("--config", path, "backends")
    assert run.code == 0 and run.err == ""        # validate's advice, not every command's


@pytest.mark.parametrize("block,where,message", [
    ("api_key_env: OPENAI_API_KEY", "backends.o.model", "missing (the openai adapter needs it)"),
    ("model: gpt-image-1\n    base_url: ftp://x", "backends.o.base_url", "must be an http"),
    ("model: gpt-image-1\n    api_key: sk-abc", "backends.o.api_key",
     "a token must not be written in the config"),
    ("model: gpt-image-1\n    family: dalle", "backends.o.family", "must be one of gpt-image"),
])
def test_openai_block_problems_are_config_errors(run_main, write_config, block, where, message):
    path = write_config("backends:\n  o:\n    adapter: openai\n    %s\n" % block)
    run = run_main("--config", path, "config", "validate")
    assert run.code == 2 and where in run.err and message in run.err


def test_sample_config_openai_block_is_valid_once_uncommented(run_main, write_config):
    with open(os.path.join(HERE, "imagen.sample.yaml")) as handle:
        lines = handle.read().splitlines()
    start = lines.index(next(line for line in lines if line.startswith("  # gpt-image-openai:")))
    end = start + 1
    while end < len(lines) and lines[end].startswith("  #   "):
        end += 1
    lines[start:end] = [line[:2] + line[4:] for line in lines[start:end]]
    run = run_main("--config", write_config("\n".join(lines) + "\n"), "config", "validate")
    assert run.code == 0 and "backends." not in run.err, run
    run = run_main("--config", write_config("\n".join(lines) + "\n"), "backends", "--json")
    rows = {b["name"]: b for b in json.loads(run.out)["backends"]}
    assert rows["gpt-image-openai"]["model"] == "gpt-image-1.5"


# ----- image input: --image and imagen edit go to /images/edits -----

def upload_name(data):
    import hashlib
    return "imagen-%s.png" % hashlib.sha256(data).hexdigest()[:16]


def test_openai_image_input_is_one_multipart_post_to_images_edits_with_each_input(
        openai, tmp_path):
    import hashlib
    openai.configure(input={"input_fidelity": "high"})
    first, second = solid_png(96, 64), solid_png(32, 32)
    (tmp_path / "fox.png").write_bytes(first)
    (tmp_path / "b.png").write_bytes(second)
    run = openai.generate("-i", "fox.png", "-i", "b.png", "--count", "2", "--strength", "0.5",
                          "--json", "-o", "out/fox.png", prompt="make it blue")
    assert run.code == 0, run
    records = [json.loads(line) for line in run.lines]
    (create,) = openai.api.creates
    assert create.path == "/v1/images/edits"
    assert create.headers["content-type"].startswith("multipart/form-data; boundary=")
    (edit,) = openai.api.edits
    # no --size: the first input's 96x64 is asked for, and 3:2 maps to 1536x1024
    assert edit["fields"] == {"model": "gpt-image-1.5", "prompt": "make it blue", "n": 2,
                              "size": "1536x1024", "input_fidelity": "high"}
    assert edit["files"] == [("image[]", upload_name(first), "image/png", first),
                             ("image[]", upload_name(second), "image/png", second)]
    assert run.err.count("o: note: this backend ignores --strength") == 1
    assert [r["seed"] for r in records] == [None, None]
    assert [r["inputs"] for r in records] == [[
        {"path": str(tmp_path / "fox.png"), "sha256": hashlib.sha256(first).hexdigest(),
         "bytes": len(first), "mime_type": "image/png", "width": 96, "height": 64},
        {"path": str(tmp_path / "b.png"), "sha256": hashlib.sha256(second).hexdigest(),
         "bytes": len(second), "mime_type": "image/png", "width": 32, "height": 32}]] * 2
    assert records[0]["backend_meta"]["endpoint"] == "/images/edits"
    # 3 text tokens, 2 x 323 input image tokens, 2 x 6240 output tokens, split over two
    assert records[0]["cost_usd"] == pytest.approx(
        (3 * 5.0 + 646 * 8.0 + 2 * 6240 * 32.0) / 1e6 / 2)


def test_openai_edit_command_on_dall_e_2_sends_its_single_image_field(
        openai, run_main, tmp_path):
    openai.configure(model="dall-e-2", input={"response_format": "b64_json"})
    (tmp_path / "in.png").write_bytes(solid_png(16, 16))
    run = run_main("--config", openai.path, "edit", "in.png", "make it blue", "--size",
                   "512x512", "-o", "e.png", "--json", extra_env=KEY_ENV)
    assert run.code == 0, run
    (edit,) = openai.api.edits
    assert [f[:2] for f in edit["files"]] == [("image", upload_name(solid_png(16, 16)))]
    assert edit["fields"]["prompt"] == "make it blue"
    assert json.loads(run.out)["cost_usd"] == 0.018
    run = run_main("--config", openai.path, "edit", "in.png", "x", "-i", "in.png",
                   extra_env=KEY_ENV)
    assert run.code == 2 and "backend o takes at most 1 input image; 2 given" in run.err
    assert len(openai.api.log) == 1


def test_openai_dall_e_3_with_an_image_is_exit_2_naming_the_backend_before_any_request(
        openai, tmp_path):
    (tmp_path / "in.png").write_bytes(solid_png(16, 16))
    (tmp_path / "notes.png").write_bytes(b"hello")
    run = openai.generate("-i", "notes.png")
    assert run.code == 2 and "--image notes.png: not a PNG, JPEG or WebP image" in run.err
    openai.configure(model="dall-e-3")
    run = openai.generate("-i", "in.png")
    assert run.code == 2 and "backend o takes no input images" in run.err
    assert openai.api.log == []


def test_openai_edit_all_sends_a_mask_after_the_images(openai, env):
    import time
    openai.configure()
    config = imagen.load_config(str(openai.path), env)
    adapter = imagen.make_adapter("o", config, dict(env, **KEY_ENV), imagen.Console(quiet=True))
    adapter.check_ready()
    image, mask = (imagen.input_image(solid_png(64, 64), name) for name in ("image", "mask"))
    (result,) = adapter.edit_all([imagen.Request("x", "", 1, 0, 1024, 1024)], [image],
                                 time.monotonic() + 10, mask=mask)
    assert [f[0] for f in openai.api.edits[0]["files"]] == ["image[]", "mask"]
    assert result.meta["endpoint"] == "/images/edits"


def test_the_fake_answers_the_official_openai_client(openai_api):
    """The official `openai` package reads the fake's answers and errors: their shapes are
    the real API's."""
    official = pytest.importorskip("openai", reason="pip install openai to check the fake")
    import base64
    # a generous connect timeout (its default is 5 s): a loaded test machine is not the fake
    client = official.OpenAI(api_key=OPENAI_KEY, base_url=openai_api.url, max_retries=0,
                             timeout=60.0)
    answer = client.images.generate(model="gpt-image-1", prompt="a red fox", size="1536x1024",
                                    quality="low", n=2)
    assert len(answer.data) == 2 and answer.size == "1536x1024" and answer.quality == "low"
    assert png_size(base64.b64decode(answer.data[0].b64_json)) == (1536, 1024)
    assert answer.usage.input_tokens_details.text_tokens == 3
    assert answer.usage.output_tokens == 2 * 408 and answer.output_format == "png"
    edited = client.images.edit(model="gpt-image-1.5", prompt="blue",
                                image=[("a.png", solid_png(8, 8), "image/png"),
                                       ("b.png", solid_png(9, 9), "image/png")])
    assert edited.usage.input_tokens_details.image_tokens == 646
    assert [f[:2] for f in openai_api.edits[0]["files"]] == [("image[]", "a.png"),
                                                            ("image[]", "b.png")]
    dalle = client.images.generate(model="dall-e-3", prompt="a fox")
    assert dalle.data[0].url.startswith(openai_api.blob_server.url)
    assert dalle.data[0].revised_prompt.endswith("a fox")
    with pytest.raises(official.BadRequestError) as caught:
        client.images.generate(model="gpt-image-1", prompt="a forbidden fox")
    assert caught.value.code == "moderation_blocked"
    with pytest.raises(official.BadRequestError) as caught:
        client.images.generate(model="gpt-image-1", prompt="x", size="999x999")
    assert (caught.value.code, caught.value.param) == ("invalid_value", "size")
    with pytest.raises(official.AuthenticationError) as caught:
        official.OpenAI(api_key="sk-nope-1234", base_url=openai_api.url, max_retries=0,
                        timeout=60.0).images.generate(model="gpt-image-1", prompt="x")
    assert caught.value.code == "invalid_api_key" and caught.value.request_id


# ===== Hardening: hostile input, broken pipes, and secrets in foreign text =====

def test_a_supabase_key_with_a_newline_is_exit_2_and_never_printed(run_main):
    run = run_main("usage", extra_env={"SUPABASE_URL": "http://127.0.0.1:9",
                                       "SUPABASE_SERVICE_KEY": "sb-SECRET-value\nx"})
    assert run.code == 2 and run.err.count("\n") == 1
    assert "SUPABASE_SERVICE_KEY" in run.err and "sb-SECRET-value" not in run.err + run.out


def test_a_bad_port_is_exit_2_and_a_config_error(run_main, write_config):
    run = run_main("usage", extra_env={"SUPABASE_URL": "http://localhost:abc",
                                       "SUPABASE_SERVICE_KEY": "sb-key-123456"})
    assert run.code == 2 and run.err == "imagen: SUPABASE_URL has a bad port (http://localhost:abc)\n"
    path = write_config("backends:\n  rep:\n    adapter: replicate\n"
                        "    model: black-forest-labs/flux-schnell\n"
                        "    base_url: http://127.0.0.1:99999/v1\n")
    run = run_main("--config", path, "config", "validate")
    assert run.code == 2 and "backends.rep.base_url: has a bad port" in run.err


def test_a_closed_stdout_still_records_every_written_image(env, tmp_path):
    proc = subprocess.Popen([sys.executable, IMAGEN, "generate", "x", "--count", "3",
                             "-o", str(tmp_path / "a.png")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()                     # like `| head -c1`: the first print breaks
    proc.wait(60)
    written = sorted(p.name for p in tmp_path.glob("*.png"))
    assert written and len(ledger_rows(env)) == len(written)

def test_generate_dash_with_stdin_closed_is_one_clear_line(env, tmp_path):
    proc = subprocess.run(["sh", "-c", 'exec "$0" "$1" generate - -o a.png <&-', sys.executable,
                           IMAGEN], capture_output=True, text=True, env=env, cwd=str(tmp_path),
                          timeout=60)
    assert proc.returncode == 2 and proc.stderr == (
        "imagen: generate -: cannot read the prompt: stdin is closed\n"), proc
    assert listing(tmp_path) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_or_closed_stdout_is_one_clear_line_and_the_image_keeps_its_ledger_row(env, tmp_path):
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, IMAGEN, "generate", "fox", "-o", "a.png"],
                              stdout=full, stderr=subprocess.PIPE, text=True, env=env,
                              cwd=str(tmp_path), timeout=60)
    assert proc.returncode == 1 and proc.stderr == (
        "imagen: stdout: No space left on device\n"), proc
    proc = subprocess.run(["sh", "-c", 'exec "$0" "$1" generate fox -o b.png >&-', sys.executable,
                           IMAGEN], capture_output=True, text=True, env=env, cwd=str(tmp_path),
                          timeout=60)
    assert proc.returncode == 1 and proc.stderr == "imagen: stdout is closed\n", proc
    assert [row["path"] for row in ledger_rows(env)] == [str(tmp_path / n) for n in ("a.png", "b.png")]


def deep_json(levels=100000):
    return "[" * levels + "]" * levels


def test_inspect_of_a_deeply_nested_embedded_record_is_a_clear_error(run_main, tmp_path):
    data = imagen.mock_png("x", 1, 64, 64)
    text = imagen.png_itxt_chunk("imagen", deep_json())
    (tmp_path / "deep.png").write_bytes(imagen.png_insert_chunks(data, text))
    run = run_main("inspect", "deep.png")
    assert run.code == 1 and run.err == "imagen: inspect: deep.png: the embedded record is not JSON\n"


@pytest.mark.parametrize("timeout", ["inf", "nan", "1e12"])
def test_an_endless_timeout_is_exit_2(run_main, timeout):
    run = run_main("generate", "x", "--timeout", timeout, "-o", "a.png")
    assert run.code == 2 and "timeout must be a number of seconds above 0" in run.err


def test_text_that_is_not_utf8_is_exit_2_and_writes_nothing(run_main, tmp_path):
    run = run_main("generate", "caf\udce9", "-o", "a.png")      # undecodable argv byte
    assert run.code == 2 and run.err == "imagen: generate: prompt is not valid UTF-8 text\n"
    run = run_main("generate", "x", "-o", "\udcff.png")
    assert run.code == 2 and "--output must be a file path in UTF-8" in run.err
    assert listing(tmp_path) == []

def test_a_nul_in_the_prompt_or_negative_is_exit_2_and_never_reaches_a_png(cli, env, tmp_path):
    run = cli("generate", "-", "-o", "a.png", stdin="a fox\x00in the snow")
    assert run.code == 2 and run.err == "imagen: generate: prompt contains a NUL character\n", run
    with pytest.raises(imagen.ImagenError) as caught:
        imagen.generate("a fox", negative="blur\x00", output=str(tmp_path / "b.png"), env=env)
    assert caught.value.code == 2
    assert caught.value.message == "generate: negative prompt contains a NUL character"
    assert listing(tmp_path) == []
    names = {"final_prompt": "p", "negative": "", "steps": 1, "seed": 1, "width": 64,
             "height": 64, "model": "odd\x00model", "backend": "b"}    # from a config or server
    assert "\x00" not in imagen.parameters_text(names)


@pytest.mark.parametrize("text,where", [("output: 5\n", "output: must be a mapping"),
                                        ("styles: [a]\n", "styles: must be a mapping")])
def test_validate_reports_a_section_that_is_no_mapping(run_main, write_config, text, where):
    run = run_main("--config", write_config(text), "config", "validate")
    assert run.code == 2 and where in run.err and "Traceback" not in run.err


def test_a_number_as_a_key_is_a_warning_not_a_crash(run_main, write_config):
    run = run_main("--config", write_config("output:\n  1: x\n"), "generate", "x", "-o", "a.png")
    assert run.code == 0 and "output.1: unknown key" in run.err


def test_output_through_a_symlink_replaces_its_target_and_keeps_the_link(run_main, tmp_path):
    (tmp_path / "target.png").write_bytes(b"old")
    os.symlink("target.png", str(tmp_path / "link.png"))
    run = run_main("generate", "x", "-o", "link.png")
    assert run.code == 0 and os.path.islink(str(tmp_path / "link.png"))
    assert (tmp_path / "target.png").read_bytes()[:4] == b"\x89PNG"


def test_output_onto_a_fifo_or_directory_is_refused_before_generating(run_main, tmp_path):
    os.mkfifo(str(tmp_path / "pipe.png"))
    (tmp_path / "dir.png").mkdir()
    for name in ("pipe.png", "dir.png"):
        run = run_main("generate", "x", "-o", name)
        assert run.code == 2 and "exists and is not a regular file" in run.err
    assert sorted(os.listdir(str(tmp_path))) == ["dir.png", "home", "pipe.png"]

# ----- an output that cannot be written: refused before any request, or its cost kept -----

def test_output_under_a_file_is_refused_before_any_request(replicate, tmp_path):
    (tmp_path / "notes").write_text("a file where a directory should be")
    run = replicate.generate("-o", "notes/fox.png")
    assert run.code == 2 and run.err.count("\n") == 1, run
    assert run.err == ("imagen: --output notes/fox.png: %s is not a directory; nothing was "
                       "submitted\n" % (tmp_path / "notes"))
    assert replicate.api.log == [] and listing(tmp_path) == ["imagen.yaml", "notes"]


def test_output_name_over_255_bytes_is_refused_before_any_request(replicate, tmp_path):
    name = "x" * 252 + ".png"
    run = replicate.generate("-o", "out/" + name)
    assert run.code == 2 and "the name %s... is 256 bytes; this filesystem takes at most 255" \
        % name[:40] in run.err, run
    assert replicate.api.log == [] and not (tmp_path / "out").exists()


def test_sidecar_name_over_255_bytes_is_refused_before_any_request(replicate, tmp_path):
    name = "x" * 247 + ".png"                     # 251 bytes; its sidecar would be 256
    run = replicate.generate("-o", name)
    assert run.code == 2 and "the sidecar name %s... is 256 bytes" % name[:40] in run.err, run
    assert "--no-sidecar" in run.err and replicate.api.log == []
    run = replicate.generate("-o", name, "--no-sidecar")
    assert run.code == 0 and (tmp_path / name).exists()


def test_output_in_a_readonly_dir_is_refused_before_any_request(replicate, tmp_path, monkeypatch):
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    if os.geteuid() == 0:       # root writes there anyway: let access() answer as for a user
        real_access = os.access
        monkeypatch.setattr(imagen.os, "access", lambda path, mode, **kw: (
            False if path == str(readonly) and mode & os.W_OK else real_access(path, mode, **kw)))
    run = replicate.generate("-o", "ro/sub/fox.png")
    assert run.code == 2 and run.err == ("imagen: --output ro/sub/fox.png: cannot create files "
                                         "in %s; nothing was submitted\n" % readonly), run
    assert replicate.api.log == []


def test_a_name_of_multibyte_characters_that_fits_is_written(run_main, tmp_path):
    name = "\U0001f98a" * 60 + ".png"            # 244 bytes, its sidecar 249: both fit
    run = run_main("generate", "x", "-o", name)
    assert run.code == 0, run
    assert listing(tmp_path) == sorted([name, name + ".json"])


def no_space(monkeypatch, calls=(1,)):
    """Make the n-th writes of a file (counting from 1) fail as on a full disk."""
    import errno
    real, count = imagen._write_all, [0]

    def write_all(fd, data):
        count[0] += 1
        if count[0] in calls:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)
    monkeypatch.setattr(imagen, "_write_all", write_all)

def test_a_sidecar_that_cannot_be_written_is_one_warning_and_the_image_is_kept(
        run_main, env, tmp_path, monkeypatch):
    (tmp_path / "a.png.json").write_text('{"seed": "of an older image"}')
    no_space(monkeypatch, calls=(2,))           # the image is written, then the sidecar fails
    run = run_main("generate", "x", "-o", "a.png")
    assert run.code == 0 and run.out == "%s\n" % (tmp_path / "a.png"), run
    assert run.err == ("imagen: sidecar: cannot write %s.json: No space left on device\n"
                       % (tmp_path / "a.png"))
    assert listing(tmp_path) == ["a.png"]       # no stale sidecar describes the new image
    assert [row["path"] for row in ledger_rows(env)] == [str(tmp_path / "a.png")]


def test_a_write_that_fails_halfway_leaves_the_file_it_replaces_intact(run_main, tmp_path,
                                                                       monkeypatch):
    """Temp file, fsync, rename: a full disk halfway through the new image must leave the
    old one whole, and no temp file behind."""
    import errno
    old = imagen.mock_png("the old image", 1, 64, 64)
    (tmp_path / "a.png").write_bytes(old)

    def half_then_full(fd, data):
        os.write(fd, bytes(data[:len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(imagen, "_write_all", half_then_full)
    run = run_main("generate", "the new image", "--size", "64x64", "-o", "a.png")
    assert run.code == 1 and "cannot write %s: No space left" % (tmp_path / "a.png") in run.err, run
    assert (tmp_path / "a.png").read_bytes() == old
    assert listing(tmp_path) == ["a.png"]


def test_inspect_skips_malformed_text_chunks(run_main, tmp_path):
    data = imagen.mock_png("x", 1, 64, 64)
    bad = imagen.png_chunk(b"iTXt", b"imagen\x00") + imagen.png_chunk(b"zTXt", b"k\x00\x00junk")
    (tmp_path / "odd.png").write_bytes(imagen.png_insert_chunks(data, bad))
    run = run_main("inspect", "odd.png")
    assert run.code == 2 and "no imagen metadata" in run.err


def test_an_unexpected_error_is_one_line_without_the_secret(run_main, monkeypatch):
    def bug(args, env):
        raise RuntimeError("boom with sk-very-secret-1 inside")
    monkeypatch.setitem(imagen.COMMANDS, "backends", (bug,) + imagen.COMMANDS["backends"][1:])
    run = run_main("backends", extra_env={"SOME_API_TOKEN": "sk-very-secret-1"})
    assert run.code == 1 and run.err.count("\n") == 1
    assert run.err.startswith("imagen: internal error: RuntimeError: boom with [redacted]")


# ===== Benchmarks (`make bench`, not collected by pytest) =====
# Each figure is a ratio against a baseline measured in the same run, median of N runs.

BENCH_RUNS = 9
BENCHES = []


def bench(function):
    BENCHES.append(function)
    return function


def median_time(argv, runs=BENCH_RUNS, env=None, cwd=None):
    import statistics
    import time
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(name, value, target, unit="ratio", better="<="):
    """One line per figure: `name ratio 1.23 (target <= 1.3)`; target None is for info."""
    if target is None:
        print("%-48s %s %.2f (no target)" % (name, unit, value))
        return True
    ok = value <= target if better == "<=" else value >= target
    print("%-48s %s %.2f (target %s %s)%s" % (name, unit, value, better, target,
                                               "" if ok else "  MISSED"))
    return ok


def bench_env():
    import tempfile
    home = tempfile.mkdtemp(prefix="imagen-bench-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGEN_", "SUPABASE_", "TMUX"))}
    env.update(HOME=home, XDG_CONFIG_HOME=os.path.join(home, "cfg"),
               XDG_DATA_HOME=os.path.join(home, "data"))
    return env, home


def installed_launcher(home):
    """`make install` into home/prefix, with this Python; returns the imagen launcher."""
    prefix = os.path.join(home, "prefix")
    subprocess.run(["make", "-s", "install", "PREFIX=" + prefix, "PYTHON=" + sys.executable],
                   cwd=HERE, check=True, stdout=subprocess.DEVNULL)
    return os.path.join(prefix, "bin", "imagen")


def installed_copy(home):
    """The module as `make install` lays it out: a directory with cached bytecode."""
    import py_compile
    import shutil
    lib = os.path.join(home, "lib")
    os.makedirs(lib, exist_ok=True)
    shutil.copy(IMAGEN, lib)
    py_compile.compile(os.path.join(lib, "imagen.py"), doraise=True,
                       cfile=None, invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    return lib


BASELINE_PNG = r"""
import struct, sys, zlib
w = h = 1024
row = bytes(x * 255 // w for x in range(w) for _ in range(3))
ramp = bytes(range(256)) * 2
raw = b"".join(b"\x00" + row.translate(ramp[y & 255:(y & 255) + 256]) for y in range(h))
def chunk(k, d):
    return struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d) & 0xFFFFFFFF)
png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
       + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
open(sys.argv[1], "wb").write(png)
"""


@bench
def bench_startup():
    env, home = bench_env()
    launcher = installed_launcher(home)
    py = sys.executable
    bare, version, help_, source = interleaved_median_times(
        [[py, "-c", "pass"], [launcher, "version"], [launcher, "--help"], [py, IMAGEN, "version"]],
        env=env, cwd=home)
    ok = report("startup: imagen version (installed launcher)", version / bare, 2.0)
    ok &= report("startup: imagen --help (installed launcher)", help_ / bare, 2.5)
    report("startup: imagen version (python imagen.py)", source / bare, None)
    return ok


@bench
def bench_mock_generate():
    env, home = bench_env()
    lib = installed_copy(home)
    env["PYTHONPATH"] = lib
    py = sys.executable
    script = os.path.join(home, "baseline.py")
    with open(script, "w") as handle:
        handle.write(BASELINE_PNG)
    baseline, ours = interleaved_median_times(
        [[py, script, os.path.join(home, "b.png")],
         [py, "-m", "imagen", "generate", "x", "--backend", "mock", "--size", "1024x1024",
          "--no-sidecar"]], env=env, cwd=home)
    return report("mock generate 1024x1024 vs PNG baseline", ours / baseline, 1.3)


# imagen's start-up tricks: (what, the module it avoids, what it imports instead). Each
# line prints what the trick saves: the import time of the avoided module minus the
# trick's, after the modules a mock generate imports anyway.
STARTUP_TRICKS = (
    ("_sha2/_sha256 instead of hashlib", "hashlib",
     "_sha2" if sys.version_info >= (3, 12) else "_sha256"),
    ("_sqlite3 instead of sqlite3", "sqlite3", "_sqlite3"),
    ("new_uuid instead of the uuid module", "uuid", None),
    ("argparse width without shutil", "shutil", None),
)


def import_ms(module, env):
    """Median milliseconds `import module` takes in a fresh interpreter that has already
    imported what a mock generate imports."""
    import statistics
    code = ("import time, argparse, json, re, zlib, imagen\n"
            "start = time.perf_counter()\n%s\n"
            "print(time.perf_counter() - start)\n" % ("import " + module if module else ""))
    times = [float(subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                  capture_output=True, text=True).stdout)
             for _ in range(BENCH_RUNS)]
    return statistics.median(times) * 1000


@bench
def bench_startup_tricks():
    env = dict(bench_env()[0], PYTHONPATH=HERE)
    for name, avoided, instead in STARTUP_TRICKS:
        report("start-up trick: %s saves" % name,
               import_ms(avoided, env) - import_ms(instead, env), None, unit="ms")
    env, home = bench_env()
    env["PYTHONPATH"] = installed_copy(home)      # its bytecode, as the launcher loads it
    for name, without, trick in GC_TRICKS:
        seconds = interleaved_median_times([[sys.executable, "-c", without],
                                            [sys.executable, "-c", trick]], env=env, cwd=home)
        report("start-up trick: %s saves" % name, (seconds[0] - seconds[1]) * 1000, None,
               unit="ms")
    return True


# The garbage collector's start-up tricks, each line an `imagen version` process: (what,
# the process without the trick, with it). main() freezes only when it reads sys.argv.
GC_TRICKS = (
    ("the collector off while the launcher imports",
     "import sys, imagen; sys.argv[1:] = ['version']; imagen.main()",
     "import gc, sys; gc.disable(); import imagen; gc.enable(); sys.argv[1:] = ['version']; "
     "imagen.main()"),
    ("gc.freeze in main()", "import imagen; imagen.main(['version'])",
     "import sys, imagen; sys.argv[1:] = ['version']; imagen.main()"),
)


@bench
def bench_mock_memory():
    env, home = bench_env()
    code = ("import resource, imagen\n"
            "imagen.main(['generate', 'x', '--size', '2048x2048', '--no-sidecar', '-o', 'a.png'])\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, PYTHONPATH=HERE), cwd=home,
                         capture_output=True, text=True, check=True).stdout
    peak_mb = int(out.split()[-1]) / 1024.0
    return report("peak memory of a 2048x2048 mock generate", peak_mb, 100, unit="MB")


def tmux_bench_setup():
    """(env, home, server): a private tmux server whose `work` pane imagen runs in, and a
    do-nothing preview tool on PATH. Close the server when done."""
    import pathlib
    from conftest import TmuxServer
    env, home = bench_env()
    bin_dir = os.path.join(home, "bin")
    os.makedirs(bin_dir)
    write_script(pathlib.Path(bin_dir, "tmux-img"), "exit 0\n")
    env.update(PATH=bin_dir + os.pathsep + env["PATH"], PYTHONPATH=installed_copy(home))
    server = TmuxServer(env)
    server.start(pathlib.Path(home))
    return env, home, server


@bench
def bench_tmux_caller():
    import statistics
    import time
    env, home, server = tmux_bench_setup()
    try:
        server.set_caller_name("agent-blue")
        pane_env = dict(env, **server.caller_env)
        times = []
        for _ in range(BENCH_RUNS * 3):
            start = time.perf_counter()
            assert imagen.resolve_caller(pane_env) == "agent-blue"
            times.append(time.perf_counter() - start)
        return report("caller from the tmux pane's @mai-name", statistics.median(times) * 1000,
                      20, unit="ms")
    finally:
        server.close()


@bench
def bench_tmux_preview():
    """What tmux costs a generate, in milliseconds added to a whole mock run."""
    env, home, server = tmux_bench_setup()
    try:
        argv = [sys.executable, "-m", "imagen", "generate", "x", "--size", "1024x1024",
                "--no-sidecar"]
        pane_env = dict(env, **server.caller_env)
        runs = BENCH_RUNS * 2
        outside = median_time(argv + ["--no-preview"], runs, env=env, cwd=home)
        inside = median_time(argv + ["--no-preview"], runs, env=pane_env, cwd=home)
        preview = median_time(argv + ["--preview"], runs, env=pane_env, cwd=home)
        ok = report("generate in a tmux pane (caller lookup) adds", (inside - outside) * 1000,
                    15, unit="ms")
        ok &= report("generate with a tmux preview window adds", (preview - inside) * 1000,
                     25, unit="ms")
        return ok
    finally:
        server.close()


@bench
def bench_replicate():
    """Against the fake API: a 1.5 s prediction must finish inside its one create request
    (Prefer: wait); a 5 s one behind a 2 s wait window is polled, and found done soon."""
    from conftest import FakeHTTPServer, FakeReplicate
    servers = []

    def start(handler):
        servers.append(FakeHTTPServer(handler))
        return servers[-1]
    fake = FakeReplicate(start)
    env, home = bench_env()
    env.update(PYTHONPATH=installed_copy(home), REPLICATE_API_TOKEN=REPLICATE_TOKEN)
    py = sys.executable
    bare = median_time([py, "-c", "pass"], env=env, cwd=home)
    ok = True
    try:
        for duration, wait, target in ((1.5, 60, 1.10), (5.0, 2, 1.25)):
            config = os.path.join(home, "replicate-%d.yaml" % wait)
            with open(config, "w") as handle:
                handle.write("backends:\n  r:\n    adapter: replicate\n    model: %s\n"
                             "    base_url: %s\n    wait: %d\n" % (SCHNELL, fake.url, wait))
            fake.duration, runs, before = duration, 3, len(fake.log)
            seconds = median_time([py, "-m", "imagen", "--config", config, "generate", "x",
                                   "--backend", "r", "--no-sidecar"], runs=runs, env=env, cwd=home)
            requests = [r for _, r in fake.log[before:] if not r.path.startswith("/files/")]
            creates = sum(r.method == "POST" for r in requests)
            gets = len(requests) - creates
            name = "replicate %.1fs prediction, wait %ds (%d/%d creates, %d GETs)" % (
                duration, wait, creates, runs, gets)
            ok &= report(name, seconds / (duration + bare), target)
            if wait == 60 and (creates != runs or gets):
                print("  MISSED: expected exactly one create request and no GET per generate")
                ok = False
    finally:
        for server in servers:
            server.close()
    return ok


def interleaved_median_times(argvs, runs=2 * BENCH_RUNS + 1, env=None, cwd=None):
    """Median time of each command, run in turns so that a busy machine slows all alike."""
    import statistics
    import time
    times = [[] for _ in argvs]
    for _ in range(runs):
        for argv, spent in zip(argvs, times):
            start = time.perf_counter()
            subprocess.run(argv, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


def interleaved(first, second, runs=BENCH_RUNS * 5):
    """(median of first, median of second), timed in alternation one call at a time, so
    that a busy moment of the machine slows both alike."""
    import statistics
    import time
    times = ([], [])
    for _ in range(runs):
        for function, spent in zip((first, second), times):
            start = time.perf_counter()
            function()
            spent.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


@bench
def bench_cloud_sync():
    """A generate that uploads and inserts, against the same generate with --no-cloud."""
    from conftest import OWNER_ID, FakeHTTPServer, FakeSupabase
    env, home = bench_env()
    env["PYTHONPATH"] = installed_copy(home)
    fake = FakeSupabase(FakeHTTPServer)
    env.update(fake.env)
    config = os.path.join(home, "imagen.yaml")
    with open(config, "w") as handle:
        handle.write('owner_user_id: "%s"\noutput:\n  cloud_sync: "on"\n' % OWNER_ID)
    argv = [sys.executable, "-m", "imagen", "--config", config, "generate", "x", "--size",
            "1024x1024", "--no-sidecar"]
    try:
        local, synced = interleaved_median_times([argv + ["--no-cloud"], argv], env=env, cwd=home)
        connections = fake.server.connections / float(len(fake.objects()))
        assert len(fake.objects()) == len(fake.rows("imagen.images")) >= BENCH_RUNS
    finally:
        fake.server.close()
    ok = report("mock generate 1024x1024 + cloud sync vs --no-cloud", synced / local, 1.6)
    ok &= report("cloud sync: connections per generate", connections, 1, unit="count")
    return ok


@bench
def bench_usage_report():
    """`imagen usage` over 50,000 rows (50 pages), against a loop that only fetches them."""
    import contextlib
    import io
    from conftest import FakeHTTPServer, FakeSupabase
    fake = FakeSupabase(FakeHTTPServer)
    rows = [{"id": "00000000-0000-4000-8000-%012d" % i,
             "created_at": "2026-%02d-%02dT%02d:%02d:00+00:00" % (
                 1 + i % 12, 1 + i % 28, i % 24, i % 60),
             "backend": ("flux-dev", "flux-schnell", "flux-pro")[i % 3],
             "model": "black-forest-labs/model-%d" % (i % 3), "latency_ms": 900 + i % 700,
             "cost_usd": (0.025, 0.003, 0.055)[i % 3], "prompt_sha256": "0" * 64,
             "caller": "agent-%d" % (i % 5)} for i in range(50000)]
    fake.tables.insert("mai", "imagen_usage", rows, "id", False)
    env = dict(bench_env()[0], **fake.env)
    query = imagen.usage_query(raw=False, since=None)
    headers = {"apikey": fake.key, "Authorization": "Bearer " + fake.key,
               "Accept": "application/json", "Accept-Profile": "mai"}

    def fetch_only():
        client = imagen.HttpClient()
        for offset in range(0, 50001, 1000):      # the 51st page is the empty, short one
            client.request("GET", "%s/rest/v1/imagen_usage?%s&limit=1000&offset=%d"
                           % (fake.url, query, offset), headers=headers)
        client.close()

    def usage():
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert imagen.main(["usage"], env=env) == 0
        return out.getvalue()

    try:
        assert " 50000 " in usage().splitlines()[-2]       # the total line counts them all
        ours, fetching = interleaved(usage, fetch_only, BENCH_RUNS)
        ratio = ours / fetching
    finally:
        fake.server.close()
    return report("usage over 50,000 rows vs fetching the pages", ratio, 1.5)


SERVE_LOAD_REQUESTS, SERVE_LOAD_CLIENTS, SERVE_LOAD_TURNS = 500, 16, 5


def serve_load(port, numbers, clients):
    """POST one generation per number from `clients` keep-alive connections at once;
    returns (wall seconds, [(status, body, seconds)])."""
    import http.client
    import threading
    import time
    answers, lock, todo = [], threading.Lock(), iter(numbers)

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                number = next(todo, None)
            if number is None:
                return conn.close()
            body = json.dumps({"prompt": "bench %d" % number, "size": "256x256"})
            start = time.perf_counter()
            conn.request("POST", "/v1/generate", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            answer = (response.status, response.read(), time.perf_counter() - start)
            with lock:
                answers.append(answer)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, answers


@bench
def bench_serve_load():
    """500 mock 256x256 generations over HTTP, 16 at a time, against the same 500 run one
    by one in-process, in turns of 100 so that a busy machine slows both alike; then every
    image must be on disk and in the ledger."""
    import statistics
    import time
    from conftest import ServeProcess
    env, home = bench_env()
    config = imagen.load_config(env=env)
    server_env, server_home = bench_env()
    server = ServeProcess([], server_env, server_home)
    one_by_one, wall, answers = 0.0, 0.0, []
    turn = SERVE_LOAD_REQUESTS // SERVE_LOAD_TURNS
    try:
        for first in range(0, SERVE_LOAD_REQUESTS, turn):
            start = time.perf_counter()
            for number in range(first, first + turn):
                imagen.generate("bench %d" % number, config=config, env=env, size="256x256",
                                preview="off", quiet=True)
            one_by_one += time.perf_counter() - start
            seconds, more = serve_load(server.port, range(first, first + turn),
                                       SERVE_LOAD_CLIENTS)
            wall += seconds
            answers += more
    finally:
        server.stop()
    failed = [answer for answer in answers if answer[0] != 200]
    paths = {json.loads(body)["images"][0]["path"] for status, body, _ in answers if status == 200}
    on_disk = sum(os.path.isfile(path) for path in paths)
    with imagen.open_ledger(server_env) as ledger:
        in_ledger = len(paths & {row["path"] for row in ledger.rows()})
    ok = not failed and on_disk == in_ledger == SERVE_LOAD_REQUESTS
    print("serve load: %d requests, %d failed, %d files on disk, %d in the ledger%s"
          % (len(answers), len(failed), on_disk, in_ledger, "" if ok else "  MISSED"))
    for line in server.log().splitlines():
        if line.startswith("imagen: ") and " serve: " not in line:
            print("  server: " + line)      # e.g. a post-step that failed
    latencies = sorted(seconds * 1000 for _, _, seconds in answers)
    ok &= report("serve: 500 requests, 16 at once, vs in-process", one_by_one / wall, 0.7,
                 better=">=")
    report("serve: p50 latency of those requests", statistics.median(latencies), None, unit="ms")
    report("serve: p99 latency of those requests", latencies[int(len(latencies) * 0.99) - 1],
           None, unit="ms")
    return ok


class McpPipe:
    """A bare stdio client for the benches: one JSON line out, the answer's line back."""

    def __init__(self, argv, env, cwd):
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def call(self, ident, method, params):
        self.proc.stdin.write(json.dumps({"jsonrpc": "2.0", "id": ident, "method": method,
                                          "params": params}).encode() + b"\n")
        self.proc.stdin.flush()
        while True:
            message = json.loads(self.proc.stdout.readline())
            if message.get("id") == ident:
                return message

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(30)


MCP_BENCH_INIT = {"protocolVersion": "2025-11-25", "capabilities": {},
                  "clientInfo": {"name": "bench", "version": "1"}}


@bench
def bench_mcp():
    """imagen mcp: start-up to the initialize answer (installed launcher, as a client would
    start it); a generate_image round trip against the same generate in-process; the
    512 px preview of a 1024x1024 mock image against that image's own generate."""
    import base64
    env, home = bench_env()
    launcher = installed_launcher(home)
    py = sys.executable

    def bare():
        subprocess.run([py, "-c", "pass"], env=env, cwd=home, check=True)

    def initialize(argv):
        def run():
            client = McpPipe(argv, env, home)
            assert "result" in client.call(1, "initialize", MCP_BENCH_INIT)
            client.close()
        return run
    start_ups = [interleaved(initialize(argv), bare, BENCH_RUNS)
                 for argv in ([launcher, "mcp"], [py, IMAGEN, "mcp"])]
    ok = report("mcp: start to the initialize answer (launcher)",
                start_ups[0][0] / start_ups[0][1], 2.0)
    report("mcp: start to the initialize answer (python imagen.py)",
           start_ups[1][0] / start_ups[1][1], None)

    config = imagen.load_config(env=env)
    client = McpPipe([launcher, "mcp"], env, home)
    client.call(0, "initialize", MCP_BENCH_INIT)
    numbers = iter(range(1, 100000))

    def over_mcp():
        answer = client.call(next(numbers), "tools/call", {"name": "generate_image", "arguments": {
            "prompt": "bench", "size": "64x64"}})
        assert base64.b64decode(answer["result"]["content"][0]["data"])

    def in_process():
        imagen.generate("bench", config=config, env=env, size="64x64", preview="off", quiet=True)
    for _ in range(3):          # warm both up: imports, the ledger's first connection
        over_mcp()
        in_process()
    mcp_seconds, local_seconds = interleaved(over_mcp, in_process)
    client.close()
    ok &= report("mcp: generate_image mock 64x64 vs imagen.generate()", mcp_seconds / local_seconds,
                 1.2)

    made = []       # each preview is of the image the generate before it made

    def generate_1024():
        made.append(imagen.generate("bench", config=config, env=env, size="1024x1024",
                                    preview="off", quiet=True)[0]["path"])

    def preview_1024():
        with open(made[-1], "rb") as handle:
            imagen.downscale_png(handle.read(), 512)
    generate_seconds, preview_seconds = interleaved(generate_1024, preview_1024)
    ok &= report("mcp: 512 px preview of a 1024x1024 mock vs its generate",
                 preview_seconds / generate_seconds, 0.5)
    noise = imagen.encode_png_image(imagen.PngImage(1024, 1024, 3, [
        os.urandom(3072) for _ in range(1024)]))
    paeth = imagen.PNG_SIGNATURE + imagen.png_chunk(b"IHDR", struct.pack(
        ">IIBBBBB", 1024, 1024, 8, 2, 0, 0, 0)) + imagen.png_chunk(b"IDAT", zlib.compress(
            b"".join(b"\x04" + os.urandom(3072) for _ in range(1024)), 1)) + \
        imagen.png_chunk(b"IEND", b"")
    for name, image in (("Sub", noise), ("Paeth", paeth)):
        seconds, _ = interleaved(lambda: imagen.downscale_png(image, 512), lambda: None, 3)
        report("mcp: 512 px preview of 1024x1024 noise (%s filter)" % name, seconds * 1000, None,
               unit="ms")
    return ok


@bench
def bench_comfyui():
    """Against the fake ComfyUI with a 2.0 s job: over the WebSocket the generate ends
    right after the job; the polling fallback may overshoot by at most its interval."""
    from conftest import FakeComfyUI
    env, home = bench_env()
    env["PYTHONPATH"] = installed_copy(home)
    py = sys.executable
    bare = median_time([py, "-c", "pass"], env=env, cwd=home)
    fake = FakeComfyUI()
    fake.job_seconds = 2.0
    ok = True
    try:
        config = os.path.join(home, "comfyui.yaml")
        with open(config, "w") as handle:
            handle.write("backends:\n  c:\n    adapter: comfyui\n    url: %s\n" % fake.url)
        for websocket, target in ((True, 1.08), (False, 1.3)):
            fake.websocket = websocket
            seconds = median_time([py, "-m", "imagen", "--config", config, "generate", "x",
                                   "--backend", "c", "--no-sidecar"], runs=3, env=env, cwd=home)
            name = "comfyui 2.0s job, %s vs job + bare start-up" % (
                "websocket" if websocket else "polling fallback")
            ok &= report(name, seconds / (fake.job_seconds + bare), target)
    finally:
        fake.close()
    return ok


@bench
def bench_image_input():
    """An edit against the text-only generate of the same model, run in turns: on the
    Replicate fake a 1 MiB input costs one upload (and its delete); on the ComfyUI fake a
    second edit with the same input is deduplicated by the server."""
    from conftest import FakeComfyUI, FakeHTTPServer, FakeReplicate, solid_png
    servers = []

    def start(handler):
        servers.append(FakeHTTPServer(handler))
        return servers[-1]
    replicate, comfy = FakeReplicate(start), FakeComfyUI()
    env, home = bench_env()
    env.update(PYTHONPATH=installed_copy(home), REPLICATE_API_TOKEN=REPLICATE_TOKEN)
    py, ok, runs = sys.executable, True, 5
    big = os.path.join(home, "big.png")
    filler = os.urandom(1024 * 1024)
    with open(big, "wb") as handle:
        handle.write(imagen.png_insert_chunks(solid_png(512, 512), imagen.png_chunk(b"fiLl", filler)))
    try:
        replicate.duration, comfy.job_seconds = 1.0, 1.0
        config = os.path.join(home, "images.yaml")
        with open(config, "w") as handle:
            handle.write("backends:\n  r:\n    adapter: replicate\n    model: black-forest-labs/"
                         "flux-kontext-pro\n    base_url: %s\n  c:\n    adapter: comfyui\n"
                         "    url: %s\n" % (replicate.url, comfy.url))
        base = [py, "-m", "imagen", "--config", config]
        text, edit = interleaved_median_times(
            [base + ["generate", "x", "--backend", "r", "--no-sidecar", "--size", "512x512"],
             base + ["edit", big, "x", "--backend", "r", "--no-sidecar"]], runs=runs, env=env, cwd=home)
        uploads, deletes = len(replicate.file_uploads), len(replicate.file_deletes)
        ok &= report("replicate edit, 1 MiB input (%d uploads, %d deletes in %d edits) vs text"
                     % (uploads, deletes, runs), edit / text, 1.15)
        if uploads != runs or deletes != runs or replicate.early_deletes():
            print("  MISSED: expected one upload and one delete per edit, none early")
            ok = False
        subprocess.run(base + ["edit", big, "x", "--backend", "c", "--no-sidecar"], env=env,
                       cwd=home, check=True, stdout=subprocess.DEVNULL)   # the first upload
        text, edit = interleaved_median_times(
            [base + ["generate", "x", "--backend", "c", "--no-sidecar", "--size", "512x512"],
             base + ["edit", big, "x", "--backend", "c", "--no-sidecar"]], runs=runs, env=env, cwd=home)
        new = sum(upload["outcome"] != "duplicate" for upload in comfy.uploads)
        ok &= report("comfyui repeated edit (%d new of %d uploads) vs text"
                     % (new, len(comfy.uploads)), edit / text, 1.1)
        if new != 1:
            print("  MISSED: the same input must be stored once by the server")
            ok = False
    finally:
        comfy.close()
        for server in servers:
            server.close()


HISTORY_BENCH_ROWS = 100000
HISTORY_BENCH_WORDS = ("red", "fox", "owl", "snow", "forest", "city", "night", "crème",
                       "brûlée", "lighthouse", "storm", "cat", "garden", "river", "castle")


def history_bench_rows(count):
    import random
    rng = random.Random(13)
    for number in range(count):
        prompt = " ".join(rng.choice(HISTORY_BENCH_WORDS) for _ in range(6)) + " %d" % number
        ident = "%08x-0000-4000-8000-%012x" % (number, number)
        stamp = "2026-%02d-%02dT%02d:%02d:%02d+00:00" % (
            1 + number // 30000, 1 + number // 1000 % 28, number // 60 % 24, number % 60,
            number % 59)
        record = {"schema": "imagen/1", "file": "%d.png" % number, "prompt": prompt,
                  "final_prompt": prompt, "negative": "", "style": None, "backend": "mock",
                  "adapter": "mock", "model": "mock-gradient-1", "seed": number, "steps": 1,
                  "width": 64, "height": 64, "requested_size": "64x64", "id": ident}
        yield (ident, "/tmp/none/%d.png" % number, "mock", stamp, 0.0, 64, 64, number,
               json.dumps(record))


@bench
def bench_history():
    """`history fox` over 100,000 generations against `imagen version`, both installed;
    and building the search index of that ledger against inserting its rows."""
    import time
    env, home = bench_env()
    launcher = installed_launcher(home)
    with imagen.open_ledger(env) as ledger:
        rows = list(history_bench_rows(HISTORY_BENCH_ROWS))
        start = time.perf_counter()
        ledger.db.execute("BEGIN")
        ledger.db.executemany("INSERT INTO generations (id, path, backend, created_at, "
                              "cost_usd, width, height, seed, record) VALUES "
                              "(?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        ledger.db.execute("COMMIT")
        inserted = time.perf_counter() - start
        start = time.perf_counter()
        imagen.ensure_search_index(ledger)
        indexed = time.perf_counter() - start
    version = median_time([launcher, "version"], env=env, cwd=home)
    history = median_time([launcher, "history", "fox"], env=env, cwd=home)
    ok = report("history fox, 100,000 rows, vs imagen version", history / version, 2.0)
    ok &= report("search index of 100,000 rows vs inserting them", indexed / inserted, 1.5)
    return ok


@bench
def bench_batch_mock():
    """200 mock images by `batch -j 8` against 200 `imagen generate` processes."""
    import time
    env, home = bench_env()
    env["PYTHONPATH"] = installed_copy(home)
    py = sys.executable
    count = 200
    start = time.perf_counter()
    for number in range(count):
        subprocess.run([py, "-m", "imagen", "generate", "fox %d" % number, "--size", "256x256",
                        "--no-preview"], env=env, cwd=home, check=True,
                       stdout=subprocess.DEVNULL)
    sequential = time.perf_counter() - start
    path = os.path.join(home, "batch.txt")
    with open(path, "w") as handle:
        handle.write("".join("owl %d\n" % number for number in range(count)))
    start = time.perf_counter()
    subprocess.run([py, "-m", "imagen", "batch", path, "-j", "8", "--size", "256x256", "-q"],
                   env=env, cwd=home, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    batched = time.perf_counter() - start
    return report("batch -j 8 of 200 mock images, images/s vs 200 processes",
                  sequential / batched, 3.0, better=">=")


@bench
def bench_batch_comfyui():
    """60 jobs of 0.25 s over 3 fake ComfyUI hosts (ideal 5 s) and over 1 (ideal 15 s)."""
    import time
    from conftest import FakeComfyUI
    env, home = bench_env()
    env["PYTHONPATH"] = installed_copy(home)
    py = sys.executable
    startup = median_time([py, "-m", "imagen", "version"], env=env, cwd=home)
    path = os.path.join(home, "batch.txt")
    with open(path, "w") as handle:
        handle.write("".join("fox %d\n" % number for number in range(60)))
    ok = True
    for hosts, target in ((3, 1.10), (1, 1.05)):
        fakes = [FakeComfyUI() for _ in range(hosts)]
        try:
            for fake in fakes:
                fake.job_seconds = 0.25
            config = os.path.join(home, "comfyui-%d.yaml" % hosts)
            with open(config, "w") as handle:
                handle.write("backends:\n  c:\n    adapter: comfyui\n    url: %s\n"
                             % json.dumps([fake.url for fake in fakes]))
            start = time.perf_counter()
            subprocess.run([py, "-m", "imagen", "--config", config, "batch", path, "--backend",
                            "c", "--size", "64x64", "-q", "--force"], env=env, cwd=home,
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            seconds = time.perf_counter() - start
        finally:
            for fake in fakes:
                fake.close()
        ideal = 60 * 0.25 / hosts
        ok &= report("batch of 60 x 0.25 s over %d ComfyUI host(s) vs ideal" % hosts,
                     seconds / (ideal + startup), target)
    return ok


@bench
def bench_gallery():
    """The gallery over HTTP on one keep-alive connection: the page's size; the first page
    of 50 thumbnails (cold cache) against the 50 full-size images; a warm thumbnail; and
    /v1/history?q=fox over 100,000 ledger rows against a /healthz round trip."""
    import shutil
    import statistics
    import time
    from conftest import ServeProcess
    env, home = bench_env()
    config = os.path.join(home, "serve.yaml")
    with open(config, "w") as handle:
        handle.write("output:\n  dir: %s\n" % os.path.join(home, "out"))
    records = [imagen.generate("bench gallery %d" % number, config=config, env=env,
                               size="1024x1024", preview="off", quiet=True)[0]
               for number in range(50)]
    server = ServeProcess(["--config", config], env, home)
    conn = server.connect()

    def get(path, headers=None):
        answer = server.request("GET", path, headers=headers, conn=conn)
        assert answer.status in (200, 304), answer
        return answer

    def seconds(paths):
        start = time.perf_counter()
        for path in paths:
            get(path)
        return time.perf_counter() - start

    ok = True
    try:
        page = get("/").body
        ok &= report("gallery: GET / size", len(page) / 1024.0, 50, unit="KB")
        images = ["/v1/images/" + os.path.relpath(r["path"], os.path.join(home, "out"))
                  for r in records]
        thumbs = [url.replace("/v1/images/", "/v1/thumbs/") + "?w=256" for url in images]
        cache = os.path.join(home, ".cache", "imagen", "thumbs")
        pixel_data = [idat_stream(r["path"]) for r in records]
        ratios, floors = [], []
        for _ in range(3):
            shutil.rmtree(cache, ignore_errors=True)
            full = seconds(images)
            ratios.append(seconds(thumbs) / full)
            floors.append(inflate_seconds(pixel_data) / full)
        ok &= report("gallery: 50 thumbnails, cold cache, vs the 50 images",
                     statistics.median(ratios), 1.5)
        # what no thumbnail of these images can go under: zlib alone (no HTTP, no pixels)
        report("gallery: only inflating the 50 images' pixels, vs the 50 images",
               statistics.median(floors), None)
        warm = [seconds(thumbs[:1]) * 1000 for _ in range(200)]
        static = [seconds(images[:1]) * 1000 for _ in range(200)]
        ok &= report("gallery: warm thumbnail (median)", statistics.median(warm), 2.0, unit="ms")
        report("gallery: warm thumbnail vs a static image GET",
               statistics.median(warm) / statistics.median(static), None)
        add_history_rows(env, 100000)
        get("/v1/history?q=fox")                 # the first query may build an index
        healthz = statistics.median(seconds(["/healthz"]) for _ in range(100))
        history = statistics.median(seconds(["/v1/history?q=fox"]) for _ in range(20))
        ok &= report("gallery: /v1/history?q=fox, 100,000 rows, vs /healthz",
                     history / healthz, 10)
    finally:
        conn.close()
        server.stop()
    return ok


def idat_stream(path):
    """The compressed pixel data of a PNG file: its IDAT chunks joined."""
    with open(path, "rb") as handle:
        chunks = imagen.png_chunks(handle.read())
    return b"".join(body for kind, body, _ in chunks if kind == b"IDAT")


def inflate_seconds(streams):
    """Seconds to inflate these zlib streams, one after the other."""
    import time
    import zlib
    start = time.perf_counter()
    for stream in streams:
        zlib.decompress(stream)
    return time.perf_counter() - start


def add_history_rows(env, count):
    """`count` ledger rows, one prompt in ten with "fox", in one transaction."""
    words = ["owl", "lake", "city", "tea", "ramen", "crane", "desert", "neon", "koi"]
    rows = []
    for number in range(count):
        prompt = "a %s number %d" % ("fox" if number % 10 == 0 else words[number % 9], number)
        stamp = "2025-%02d-%02dT%02d:%02d:%02d+00:00" % (
            1 + number // 10000 % 12, 1 + number // 400 % 28, number // 60 % 24, number % 60,
            number % 60)
        rows.append(("bench-%d" % number, "/nowhere/%d.png" % number, "mock", stamp,
                     json.dumps({"prompt": prompt, "seed": number, "backend": "mock"})))
    with imagen.open_ledger(env) as ledger:
        ledger.db.execute("BEGIN")
        ledger.db.executemany("INSERT INTO generations (id, path, backend, created_at, record)"
                              " VALUES (?, ?, ?, ?, ?)", rows)
        ledger.db.execute("COMMIT")


def big_png(width=1024, height=1024):
    """A valid PNG of noise stored without compression: 3 MiB, so 4 MiB as base64."""
    import random
    import zlib
    rng = random.Random(15)
    raw = b"".join(b"\x00" + bytes(rng.getrandbits(8) for _ in range(width * 3))
                   for _ in range(height))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                               0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 0)) + chunk(b"IEND", b""))


@bench
def bench_openai():
    """Against the fake OpenAI with a 2.0 s generation: the generate ends right after the
    answer, in one request over one connection; an answer holding a 4 MiB b64_json image
    (received, decoded, checked and written) costs little more than a small one."""
    import base64
    from conftest import OPENAI_KEY, FakeHTTPServer, FakeOpenAI
    servers = []

    def start(handler):
        servers.append(FakeHTTPServer(handler))
        return servers[-1]
    small, large = FakeOpenAI(start), FakeOpenAI(start)
    small.delay = large.delay = 2.0
    large.image_body = big_png()
    env, home = bench_env()
    env.update(PYTHONPATH=installed_copy(home), OPENAI_API_KEY=OPENAI_KEY)
    py = sys.executable
    config = os.path.join(home, "openai.yaml")
    with open(config, "w") as handle:
        handle.write("backends:\n" + "".join(
            "  %s:\n    adapter: openai\n    model: gpt-image-1.5\n    base_url: %s\n"
            % (name, fake.url) for name, fake in (("small", small), ("large", large))))
    argv = [py, "-m", "imagen", "--config", config, "generate", "x", "--no-sidecar",
            "--backend"]
    runs = 5
    try:
        bare = median_time([py, "-c", "pass"], env=env, cwd=home)
        job, with_large = interleaved_median_times([argv + ["small"], argv + ["large"]],
                                                   runs=runs, env=env, cwd=home)
        requests, connections = len(small.log) / float(runs), small.server.connections / float(runs)
    finally:
        for server in servers:
            server.close()
    encoded = len(base64.b64encode(large.image_body)) / 2.0 ** 20
    ok = report("openai 2.0s generation vs job + bare start-up", job / (small.delay + bare), 1.05)
    ok &= report("openai: requests per generate", requests, 1, unit="count")
    ok &= report("openai: connections per generate", connections, 1, unit="count")
    ok &= report("openai: a %.1f MiB b64_json answer adds, vs the job" % encoded,
                 max(0.0, with_large - job) / small.delay, 0.1)
    return ok


def run_benches(names=None):
    print("imagen bench: Python %s, %d runs each, median" % (sys.version.split()[0], BENCH_RUNS))
    ok = True
    for function in BENCHES:
        if not names or function.__name__ in names:
            ok &= bool(function())
    return 0 if ok else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bench"]:
        sys.exit(run_benches(sys.argv[2:]))
    sys.exit(pytest.main([__file__] + sys.argv[1:]))
