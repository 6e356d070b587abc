"""Every file under configs/ is parsed by the code that will read it (nothing is trained).

- Launch scripts (.sh, .bat): continuation lines joined (``\\`` / ``^``), variables replaced by their
  defaults, and every sd3_train.py / sd3_train_network.py command parsed by the trainer's own parser,
  its dataset config resolved and its optimizer arguments checked against the optimizer; paths under
  configs/ must exist; a .sh and a .bat of the same name must run the same commands.
- Dataset TOMLs: library.data.toml_config. Sample prompts: library.training.sampling.read_sample_prompts.
- Curricula (``[[stage]]`` TOMLs): library.cli.stages.plan_stages with the command documented in the
  file's comments (its input files replaced by placeholders).
A file of any other type fails, so a new kind of config cannot go untested.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import toml

from library.cli import data as data_flags
from library.cli.train import parse_train_args
from library.data.cli_datasets import DatasetDefaults
from library.data.toml_config import load_dataset_config
from library.training.sampling import read_sample_prompts

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TRAINERS = {"sd3_train.py": False, "sd3_train_network.py": True}
CONTINUATION = {".sh": "\\", ".bat": "^"}
LAUNCHERS = ("accelerate", "python", "python3", "py")  # a command line starts with one of these
_SH_DEFAULT = re.compile(r'^(\w+)="\$\{\1:-(.*)\}"$')
_BAT_DEFAULT = re.compile(r'^if not defined (\w+) set "\1=(.*)"$', re.IGNORECASE)


def _config_files() -> list[Path]:
    return sorted(p for p in CONFIGS.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def _logical_lines(text: str, continuation: str) -> list[str]:
    lines, current = [], ""
    for raw in text.replace("\r\n", "\n").split("\n"):
        if raw.rstrip().endswith(continuation) and not raw.endswith(continuation):
            raise AssertionError(f"whitespace after the line continuation breaks the command: {raw!r}")
        if raw.endswith(continuation):
            current += raw[:-1] + " "
            continue
        lines.append(current + raw)
        current = ""
    return lines


def _tokens(line: str, suffix: str) -> list[str]:
    if suffix == ".sh":
        return shlex.split(line, comments=True)
    return [t[1:-1] if t.startswith('"') and t.endswith('"') else t for t in re.findall(r'"[^"]*"|\S+', line)]


def _expand(token: str, variables: dict[str, str]) -> str:
    def value(match: re.Match) -> str:
        return variables.get(next(g for g in match.groups() if g), match.group(0))

    token = re.sub(r"\$\{(\w+)\}|\$(\w+)|%(\w+)%", value, token)
    return token.replace("\\", "/")


def trainer_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(trainer script, its arguments) of every trainer command in a launch script, variables expanded."""
    variables: dict[str, str] = {}
    commands = []
    for line in _logical_lines(path.read_text(encoding="utf-8"), CONTINUATION[path.suffix]):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "rem ", "::", "@echo")) or stripped.lower() == "rem":
            continue
        default = (_SH_DEFAULT if path.suffix == ".sh" else _BAT_DEFAULT).match(stripped)
        if default:
            variables[default.group(1)] = default.group(2)
            continue
        if stripped.split()[0] not in LAUNCHERS or not any(script in stripped for script in TRAINERS):
            continue
        tokens = [_expand(t, variables) for t in _tokens(stripped, path.suffix)]
        for i, token in enumerate(tokens):
            if Path(token).name in TRAINERS:
                commands.append((Path(token).name, tokens[i + 1:]))
    return commands


def _check_launch(path: Path) -> None:
    from library.training.optimizer_args import check_optimizer_args, parse_optimizer_args
    from library.training.optimizers import resolve_optimizer_class

    commands = trainer_commands(path)
    assert commands, f"{path.name}: no sd3_train.py / sd3_train_network.py command found"
    for script, argv in commands:
        cfg, ns = parse_train_args(argv, network=TRAINERS[script])
        for value in argv:
            if value.startswith("configs/"):
                assert (ROOT / value).is_file(), f"{path.name} refers to {value}, which does not exist"
        assert cfg.save.output_name and ns.dataset_config, f"{path.name}: needs --output_name and --dataset_config"
        data_flags.dataset_blueprint(ns)  # the referenced dataset TOML resolves with these flags
        check_optimizer_args(resolve_optimizer_class(ns.optimizer_type), parse_optimizer_args(ns.optimizer_args or ()))
    twin = path.with_suffix(".bat" if path.suffix == ".sh" else ".sh")
    assert twin.is_file(), f"{path.name} has no {twin.suffix} twin for the other OS"
    assert trainer_commands(twin) == commands, f"{path.name} and {twin.name} run different commands"


def _placeholder_inputs(argv: list[str], folder: Path) -> list[str]:
    """The argv with every input-file flag pointing at an empty (valid) safetensors file in ``folder``."""
    from library.cli.stages import INPUT_FILES
    from library.models.safetensors_io import save_safetensors

    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg.startswith("--") and arg[2:] in INPUT_FILES:
            placeholder = folder / f"{arg[2:]}.safetensors"
            save_safetensors({}, placeholder)
            out[i + 1] = str(placeholder)
    return out + ["--output_dir", str(folder / "out")]


def _check_curriculum(path: Path, tmp_path: Path) -> None:
    from library.cli.stages import plan_stages

    text = path.read_text(encoding="utf-8")
    documented = "\n".join(line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#"))
    doc_file = tmp_path / "command.sh"
    doc_file.write_text(documented)
    commands = trainer_commands(doc_file)
    assert commands, f"{path.name}: document the command that runs it (accelerate launch sd3_train.py --stages ...)"
    for script, argv in commands:
        runs = plan_stages(_placeholder_inputs(argv, tmp_path), str(path), network=TRAINERS[script])
        assert len(runs) == len(toml.loads(text)["stage"]) and all(r.argv for r in runs)


def _kind(path: Path) -> str:
    if path.suffix in CONTINUATION:
        return "launch"
    if path.suffix == ".txt":
        return "prompts"
    if path.suffix == ".toml":
        keys = set(toml.loads(path.read_text(encoding="utf-8")))
        if "stage" in keys:
            return "curriculum"
        if keys & {"datasets", "general"}:
            return "dataset"
        if "prompt" in keys:
            return "prompts"
    return "unknown"


@pytest.mark.parametrize("path", _config_files(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_file_parses(path: Path, tmp_path: Path) -> None:
    kind = _kind(path)
    assert kind != "unknown", f"{path.relative_to(ROOT)}: tests/test_configs.py does not know this kind of file"
    if kind == "launch":
        _check_launch(path)
    elif kind == "dataset":
        blueprint = load_dataset_config(path, DatasetDefaults())
        assert blueprint.datasets and all(d.subsets for d in blueprint.datasets)
    elif kind == "prompts":
        assert read_sample_prompts(str(path))
    else:
        _check_curriculum(path, tmp_path)


def test_the_parser_of_this_test_sees_continuations_and_variables(tmp_path: Path) -> None:
    sh = tmp_path / "x.sh"
    sh.write_text('M="${M:-models}"\n# accelerate launch sd3_train.py --nope\naccelerate launch sd3_train.py \\\n'
                  '  --pretrained_model_name_or_path "$M/a b.safetensors" \\\n  --seed 3\n')
    bat = tmp_path / "x.bat"
    bat.write_text('@echo off\r\nif not defined M set "M=models"\r\naccelerate launch sd3_train.py ^\r\n'
                   '  --pretrained_model_name_or_path "%M%\\a b.safetensors" ^\r\n  --seed 3\r\n')
    expected = [("sd3_train.py", ["--pretrained_model_name_or_path", "models/a b.safetensors", "--seed", "3"])]
    assert trainer_commands(sh) == expected == trainer_commands(bat)
    bad = tmp_path / "y.sh"
    bad.write_text("accelerate launch sd3_train.py \\ \n  --seed 3\n")
    with pytest.raises(AssertionError, match="whitespace after the line continuation"):
        trainer_commands(bad)
    assert _kind(tmp_path / "notes.md") == "unknown"
