"""The prepared GPU check runs end to end (on CPU with --tiny): every step, every figure, one file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO


@pytest.mark.slow
def test_gpu_check_runs_every_step_with_tiny_models(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--tiny"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert list(report["steps"]) == ["build", "fit_speed", "test", "generate", "rl_step"]
    assert report["steps"]["rl_step"]["generation_s"] > 0 and report["steps"]["rl_step"]["update_s"] > 0
    assert all(step["ok"] for step in report["steps"].values())
    speed = json.loads((tmp_path / "out" / "fit_speed.json").read_text())
    arms = speed["arms"]
    assert list(arms)[:2] == ["seed-trainer", "sft.yaml"]  # the main arms first: a budget never cuts them
    assert {"ckpt-4096", "sdpa", "all"} <= set(arms)
    assert all(a["tokens_per_s"] > 0 and a["losses"] and "allocated_at_start_gib" in a for a in arms.values())
    # every medadapt arm starts from the same weights on the same rows: the same first loss (fp32 here)
    first = arms["sft.yaml"]["losses"][0]
    assert all(abs(a["losses"][0] - first) <= 1e-4 * abs(first) for n, a in arms.items()
               if n not in ("seed-trainer", "ckpt-4096"))
    assert arms["ckpt-4096"]["checkpointing"] is True
    assert not (tmp_path / "out" / "model").exists()  # the model is built outside $OUT
    assert arms["all"]["attention"] == "medadapt_varlen" and arms["all"]["packed_max_rel"] < 1e-5  # varlen on CPU
    assert arms["all"]["micro_batch_rows"] == 3 and arms["all"]["checkpointing"] is False
    assert arms["sdpa"]["accumulation"] == 3
    assert report["steps"]["test"]["items"] == 18 and report["steps"]["test"]["loaded_in_4bit"] is True
    assert report["steps"]["test"]["items_per_s"] > 0 and report["steps"]["generate"]["generated_tokens"] > 0
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "## SFT step as `fit` runs it" in md and "| seed-trainer |" in md


def test_every_fit_speed_arm_parses_over_the_shipped_config(monkeypatch, tmp_path):
    """The GPU run's arms the CPU proof does not run (each is configs/sft.yaml with other overrides): every one, with
    the arms that need CUDA, flash_attn, Liger or Triton, parses against medadapt's CLI as fit_speed builds it."""
    import importlib.util

    from .cli_parse import parse_fit

    sys.path.insert(0, str(REPO / "benchmarks"))
    import fit_speed

    real = importlib.util.find_spec
    monkeypatch.setattr(fit_speed.importlib.util, "find_spec",
                        lambda name, *a: object() if name in ("liger_kernel", "flash_attn", "triton") else real(name, *a))
    plan = fit_speed.arm_plan(cuda=True)
    assert {"issue-19", "varlen", "flash_attention_2", "liger", "fp16", "flex_attention", "no-ckpt"} <= set(plan)
    ctx = {"model_dir": str(tmp_path / "model"), "sft": str(tmp_path / "sft.json"), "seq": 2048, "warmup": 2,
           "steps": 5, "extra": []}
    for name, (overrides, _) in plan.items():
        fit = parse_fit(fit_speed.arm_args(ctx, tmp_path, overrides))
        for key, value in dict(zip(overrides[::2], overrides[1::2])).items():  # each override took (the last wins)
            node = fit
            for part in key.removeprefix("--").split("."):
                node = node[part] if part in node else node["init_args"][part]  # --model.x: the class's init_args
            assert str(node).lower() == value.lower() or (str(node)[0].isdigit() and float(node) == float(value)), (
                name, key, node)


def test_the_seed_arm_builds_the_seed_s_model_not_medadapt_s_defaults(tiny_qwen):
    """The seed's Trainer arm must time the seed's model: every setting the issue-19 arm undoes (issue 26's levers)
    at the seed's value on CPU and CUDA, whatever medadapt's defaults become; and the built model really is PEFT's
    (fp32-upcast frozen weights under a bf16 compute dtype, PEFT's LoRA forward, eager layers). Built on the
    defaults, it had been timing the bf16 base, medadapt's LoRA forward and (on CUDA) compiled layers as the seed."""
    import dataclasses

    import torch

    from medadapt.model import is_compiled, load_model

    sys.path.insert(0, str(REPO / "benchmarks"))
    import fit_speed

    undone = dict(zip(*[iter(fit_speed.arm_plan(cuda=True)["issue-19"][0])] * 2))
    assert undone, "the issue-19 arm undoes nothing"
    for cuda in (False, True):
        model, lora = fit_speed.seed_configs("m", cuda)
        for key, value in undone.items():
            section, field = key.removeprefix("--model.").split(".")
            got = getattr(model if section == "model" else lora, field)
            assert str(got).lower() == value, (cuda, key, got)
        assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (16, 32, 0.05, "all-linear")
        assert (model.load_in_4bit, model.quant_type, model.double_quant, model.liger) == (True, "nf4", True, False)
        assert model.compute_dtype == ("float16" if cuda else "float32")
    model, lora = fit_speed.seed_configs(tiny_qwen, cuda=False)
    built = load_model(dataclasses.replace(model, compute_dtype="bfloat16"), lora, training=True)
    assert not is_compiled(built)
    assert not [n for n, m in built.named_modules() if hasattr(m, "_medadapt_group")], "medadapt's LoRA forward"
    frozen = {p.dtype for p in built.parameters() if not p.requires_grad and p.dtype.is_floating_point}
    assert frozen == {torch.float32}, frozen  # PEFT's prepare_model_for_kbit_training upcast


def test_a_benchmark_s_scratch_folder_goes_when_its_process_ends(tmp_path):
    """The benchmarks build random-weight models of 1-4 GB in temporary folders: each is removed when the process that
    made it exits (and not before: gpu_check tests the adapter fit_speed exported there)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from scratch import scratch_dir; "
            "d = scratch_dir('medadapt-test-'); (d / 'model.safetensors').write_bytes(b'x' * 1000); "
            "assert (d / 'model.safetensors').exists(); print(d)")
    proc = subprocess.run([sys.executable, "-c", code, str(REPO / "benchmarks")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    made = proc.stdout.strip().splitlines()[-1]
    assert made and not os.path.exists(made)


def test_the_compile_watch_sees_graphs_breaks_and_a_recompile_limit_hit():
    """fit_speed's compiled arms must say when dynamo gave up: a frame recompiled past its limit runs eager from then
    on, with one log line (the watch reads it: a torch that words it otherwise fails here, not silently on a GPU)."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from compile_watch import CompileWatch

    def layer(x, n):
        return x * n + 1

    def broken(x):
        y = x.sin()
        torch._dynamo.graph_break()
        return y.cos()

    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="eager", dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=2, automatic_dynamic_shapes=False), CompileWatch() as watch:
        for n in range(4):  # a new constant each call: a recompile each time, eager after the second
            compiled(torch.ones(3), n)
        torch.compile(broken, backend="eager")(torch.ones(3))
    report = watch.report()
    assert report["graphs"] >= 3 and report["graph_breaks"] >= 1, report
    assert report["recompile_limit_hits"] and "recompile_limit" in report["recompile_limit_hits"][0], report
    assert "RECOMPILE LIMIT HIT" in CompileWatch.note({"compiled": True, **report})
    assert CompileWatch.note({"compiled": False, **report}) == ""
