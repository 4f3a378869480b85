"""The training step's invariants: token-weighted loss, accumulation equivalence, 4-bit CPU, resume, export."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from medadapt.data.packing import IGNORE_INDEX
from medadapt.module import CausalLMModule

from .conftest import assert_close_to_scale, connect, tiny_data, tiny_module, tiny_trainer


class Recording(CausalLMModule):
    """Records each optimizer step's gradients (after medadapt's rescaling, before the optimizer) and loss."""

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        if not hasattr(self, "grads"):
            self.grads, self.losses = [], []
        self.grads.append({n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None})
        self.losses.append(float(self.last_step_loss))
        Recording.last_losses = self.losses  # survives a run that dies


def run_steps(model_path, data_file, root, *, batch_size, accumulate, steps, shuffle=True):
    L.seed_everything(0)
    module = tiny_module(model_path, cls=Recording)
    data = tiny_data(data_file, batch_size=batch_size, pack=False, val_fraction=0.0, shuffle=shuffle)
    trainer = tiny_trainer(root, max_steps=steps, accumulate_grad_batches=accumulate)
    trainer.fit(module, connect(data, module))
    return module, data, module


def test_batch_times_accumulation_equivalence(tiny_qwen, short_sft_file, tmp_path):
    _, data, big = run_steps(tiny_qwen, short_sft_file, tmp_path / "a", batch_size=4, accumulate=1, steps=1)
    _, _, small = run_steps(tiny_qwen, short_sft_file, tmp_path / "b", batch_size=1, accumulate=4, steps=1)
    assert big.grads[0].keys() == small.grads[0].keys() and big.grads[0]
    for name, g in big.grads[0].items():
        assert_close_to_scale(small.grads[0][name], g, msg=name)
    assert small.losses[0] == pytest.approx(big.losses[0], rel=1e-5)

    # and the loss really is token-weighted: the mean over all supervised tokens of the 4 rows
    loader = data.train_dataloader()
    batch = next(iter(loader))
    supervised = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)
    assert len(set(supervised.tolist())) > 1, "rows must differ in supervised length for this test to bite"


@pytest.mark.slow  # out of the 5-minute fast set; CI runs it
def test_fit_validate_fit_4bit_on_cpu_loss_decreases(tiny_qwen, short_sft_file, tmp_path):
    L.seed_everything(0)
    module = tiny_module(tiny_qwen, load_in_4bit=True, lr=3e-3)
    data = tiny_data(short_sft_file, batch_size=4, val_fraction=0.25)
    first = tiny_trainer(tmp_path, max_steps=1, limit_val_batches=2)
    before = first.validate(module, connect(data, module))[0]["val/loss"]
    first.fit(module, connect(data, module))  # training after an eval-mode forward: the CPU repacking trap
    trainer = tiny_trainer(tmp_path, max_steps=12, limit_val_batches=2)
    trainer.fit(module, connect(data, module))
    after = trainer.validate(module, connect(data, module))[0]["val/loss"]
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in module.model.modules())
    assert after < before - 0.05, (before, after)


class Preempted(Exception):
    pass


class Crash(Callback):
    """Kills the run at the start of a given optimizer step, as a preempted job would be."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise Preempted


def test_resume_mid_epoch_matches_uninterrupted(tiny_qwen, short_sft_file, tmp_path):
    """Same schedule (max_steps), same data order, same dropout masks: a crash changes nothing."""

    def losses(root, callbacks=(), ckpt_path=None):
        L.seed_everything(0)
        module = tiny_module(tiny_qwen, dropout=0.1, cls=Recording)
        data = tiny_data(short_sft_file, batch_size=2, val_fraction=0.0)
        trainer = tiny_trainer(root, max_steps=5, accumulate_grad_batches=2, callbacks=list(callbacks),
                               enable_checkpointing=bool(callbacks))
        trainer.fit(module, connect(data, module), ckpt_path=ckpt_path)
        return getattr(module, "losses", [])

    full = losses(tmp_path / "full")
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    with pytest.raises(Preempted):
        losses(tmp_path / "crash", [saver, Crash(at_step=2)])  # after 4 of 16 batches: mid-epoch
    first = list(Recording.last_losses)
    ckpt = tmp_path / "ckpt" / "step=2.ckpt"
    saved = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert saved["state_dict"] and all("lora_" in k for k in saved["state_dict"])
    rest = losses(tmp_path / "resume", ckpt_path=str(ckpt))
    assert len(full) == 5 and len(first) == 2 and len(rest) == 3
    assert first == pytest.approx(full[:2], rel=1e-6)
    assert rest == pytest.approx(full[2:], rel=1e-6), (full, first, rest)


def test_adapter_export_loads_with_peft(tiny_qwen, short_sft_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    L.seed_everything(0)
    module = tiny_module(tiny_qwen, lr=1e-2)
    module.hparams.adapter_dir = str(tmp_path / "adapter")
    trainer = tiny_trainer(tmp_path, max_steps=2)
    trainer.fit(module, connect(tiny_data(short_sft_file, batch_size=2, val_fraction=0.0), module))
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    module.model.eval()
    ids = torch.tensor([[151646, 100, 200, 300, 400]])
    with torch.no_grad():
        ref = module.model(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_qwen, dtype=torch.float32)(input_ids=ids).logits
    assert_close_to_scale(got, ref)
    assert not torch.allclose(plain, ref, atol=1e-4), "training changed nothing: the export check would be vacuous"


def test_cpt_trains_embeddings_and_head_at_their_own_learning_rate(tiny_qwen, tmp_path):
    """lora.modules_to_save + optim.embedding_lr: embeddings and LM head train in full, in their own
    parameter group (Unsloth's CPT recipe), next to the LoRA tensors at the main learning rate."""
    from medadapt.data.textbooks import TextbooksDataModule
    from medadapt.model_config import LoraConfig, ModelConfig
    from medadapt.optim import OptimConfig

    from .conftest import DATA

    module = CausalLMModule(model=ModelConfig(name_or_path=tiny_qwen, load_in_4bit=False, compute_dtype="float32",
                                              gradient_checkpointing=False),
                            lora=LoraConfig(r=8, alpha=16, dropout=0.0, modules_to_save=["embed_tokens", "lm_head"]),
                            optim=OptimConfig(lr=1e-3, embedding_lr=1e-4, warmup_steps=0, fused=False))
    data = TextbooksDataModule(data_files=str(DATA / "corpus" / "textbooks_sample.json"), max_docs=8, block_size=64,
                               val_fraction=0.0, batch_size=2)
    trainer = tiny_trainer(tmp_path, max_steps=2)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.named_parameters() if "modules_to_save" in n}
    trainer.fit(module, connect(data, module))
    groups = trainer.optimizers[0].param_groups
    embed_group = [g for g in groups if g["initial_lr"] == 1e-4]
    assert len(embed_group) == 1 and all(g["initial_lr"] == 1e-3 for g in groups if g is not embed_group[0])
    saved = {id(p) for n, p in module.named_parameters() if "modules_to_save" in n}
    assert {id(p) for p in embed_group[0]["params"]} == saved and len(saved) == 2
    after = dict(module.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in before)  # both trained


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "32-true"])
def test_every_precision_trains_with_clipping_and_fused_only_where_compatible(tiny_qwen, short_sft_file, tmp_path,
                                                                             monkeypatch, precision):
    """A fused AdamW with clipping crashed on the first step under 16-mixed and bf16-mixed (Lightning refuses to
    clip for optimizers that unscale internally). Fused AdamW exists on CPU too: letting medadapt pick it there,
    and giving 16-mixed its fp16 grad scaler on CPU (Lightning would switch to bf16), forces the CUDA paths."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from medadapt import optim

    monkeypatch.setattr(optim, "FUSED_DEVICES", ("cuda", "cpu"))
    L.seed_everything(0)
    module = tiny_module(tiny_qwen, cls=Recording, fused=True)
    kw = {"precision": precision}
    if precision == "16-mixed":
        kw = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    trainer = tiny_trainer(tmp_path, max_steps=2, gradient_clip_val=1e-3, **kw)
    trainer.fit(module, connect(tiny_data(short_sft_file, batch_size=1, val_fraction=0.0, pack=False), module))
    assert len(module.losses) == 2 and all(math.isfinite(x) for x in module.losses)
    assert bool(trainer.optimizers[0].defaults["fused"]) == (precision != "16-mixed")


def test_metrics_are_logged_at_their_optimizer_step_and_count_examples(tiny_qwen, short_sft_file, tmp_path):
    """train/loss of optimizer step k is written at step k (as checkpoint step=k), val/loss after k steps at k;
    examples and tokens per step are what the loader delivered."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    L.seed_everything(0)
    module = tiny_module(tiny_qwen)
    data = tiny_data(short_sft_file, batch_size=2, val_fraction=0.125, max_length=256)
    trainer = tiny_trainer(tmp_path, max_steps=3, accumulate_grad_batches=2, log_every_n_steps=1,
                           logger=CSVLogger(tmp_path, name="log"), val_check_interval=6, limit_val_batches=1)
    trainer.fit(module, connect(data, module))
    rows = list(csv.DictReader(open(next((tmp_path / "log").rglob("metrics.csv")))))
    train = [r for r in rows if r.get("train/loss")]
    assert [int(r["step"]) for r in train] == [1, 2, 3]
    assert [int(r["step"]) for r in rows if r.get("val/loss")] == [3]
    batches = list(data.train_dataloader())[:6]  # the same sampler order (epoch 0)
    for k, r in enumerate(train):
        micro = batches[2 * k : 2 * k + 2]
        assert float(r["train/examples_per_step"]) == sum(int(b["segment_ids"].amax(1).sum()) for b in micro)
        assert float(r["train/tokens_per_step"]) == sum(int((b["segment_ids"] > 0).sum()) for b in micro)


def test_training_step_does_not_sync_with_the_host(tiny_qwen, short_sft_file, tmp_path, monkeypatch):
    """No host sync in the micro-batch path nor at an optimizer step that does not log: no .item()/float()/int()/
    tolist() on a tensor and no tensor built from host values on the device (``torch.tensor(…, device=…)`` is a
    blocking copy on CUDA) in the step outside the model's own forward, and none in ``on_before_optimizer_step``
    except on logging steps. Loss sums and token counts stay on the device until a logging step reads them."""
    conversions = []
    counting = [False]
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "cpu"):
        original = getattr(torch.Tensor, name)

        def wrapped(self, *a, _original=original, _name=name, **kw):
            if counting[0]:
                conversions.append(_name)
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    original_tensor = torch.tensor

    def tensor(*a, **kw):
        if counting[0] and kw.get("device") is not None:
            conversions.append("torch.tensor(device=…)")
        return original_tensor(*a, **kw)

    monkeypatch.setattr(torch, "tensor", tensor)

    class Counting(CausalLMModule):
        def training_step(self, batch, batch_idx):
            counting[0] = True
            try:
                return super().training_step(batch, batch_idx)
            finally:
                counting[0] = False

        def forward(self, batch):  # the model's own internals are not medadapt's to change
            counting[0] = False
            try:
                return super().forward(batch)
            finally:
                counting[0] = True

        def on_before_optimizer_step(self, optimizer):
            step = self.trainer.global_step + 1
            counting[0] = step != 1 and step % self.trainer.log_every_n_steps != 0  # steps that do not log
            try:
                super().on_before_optimizer_step(optimizer)
            finally:
                counting[0] = False

    L.seed_everything(0)
    module = tiny_module(tiny_qwen, cls=Counting)
    tiny_trainer(tmp_path, max_steps=3, accumulate_grad_batches=2, log_every_n_steps=10).fit(
        module, connect(tiny_data(short_sft_file, batch_size=2, val_fraction=0.0), module))
    assert module.trainer.global_step == 3 and conversions == []


def test_the_model_is_built_for_the_call_that_runs_not_for_the_first_call(tiny_qwen, short_sft_file, tmp_path):
    """validate builds an inference model; a fit that follows trains a model built for training: k-bit
    preparation (frozen base, input grads) and gradient checkpointing on."""
    L.seed_everything(0)
    module = tiny_module(tiny_qwen, load_in_4bit=True)
    data = connect(tiny_data(short_sft_file, batch_size=2, val_fraction=0.25), module)
    tiny_trainer(tmp_path, limit_val_batches=1).validate(module, data)
    assert module.built_for_training is False and not module.model.is_gradient_checkpointing
    tiny_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, data)
    base = module.model.get_base_model()
    assert module.built_for_training is True and base.is_gradient_checkpointing
    assert base.is_loaded_in_4bit and hasattr(base, "_require_grads_hook")  # k-bit preparation ran
    assert base.get_input_embeddings().weight.requires_grad is False  # frozen base, LoRA on top
    assert any(p.requires_grad for n, p in module.model.named_parameters() if "lora_" in n)
