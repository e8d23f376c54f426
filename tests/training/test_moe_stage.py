"""MoE balancing inside a stage: the hybrid Nemotron-H backbone (conf/model/tiny_hybrid.yaml) gets the
load-balancing loss (coefficient 1e-6) in its training loss and its routing bias moves after every optimizer step
-- only in stages that train the LLM."""

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from audex.data.collate import collate_padded
from audex.data.schema import make_text_cut
from audex.data.sequence import SequenceBuilder
from audex.parts.optim import build_optimizer_and_scheduler
from audex.training.run import build_model

ROOT = Path(__file__).resolve().parents[2]


def _stage(name):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name=name, overrides=["model=tiny_hybrid"])


def _batch(model):
    builder = SequenceBuilder(model.tokenizer, model.frames_for_samples, max_length=None)
    chats = [make_text_cut(f"c{i}", [{"role": "user", "content": f"Count to {i}."},
                                     {"role": "assistant", "content": " ".join(str(k) for k in range(i + 3))}])
             for i in range(3)]
    return collate_padded([builder(c) for c in chats], model.tokenizer.pad_id)  # Mamba layers: one sample per row


def test_moe_terms_in_training_step_and_bias_update():
    torch.manual_seed(0)
    cfg = _stage("stage2")
    model, report = build_model(cfg)
    balancer = model.moe_balancer
    assert balancer is not None and len(balancer.routers) == 2  # "ME*E": two MoE layers
    batch = _batch(model)
    loss, stats = model.compute_loss(batch)
    aux = stats["moe_aux_loss"]
    assert torch.isfinite(loss) and torch.isfinite(aux)
    assert 1e-6 <= aux.item() <= 8e-6  # coefficient x (E * sum f_i P_i in [1, E])
    optimizer, _ = build_optimizer_and_scheduler(model, cfg.model.optim, max_steps=10,
                                                 moe_balancer=model.moe_balancer)
    before = [r.e_score_correction_bias.clone() for _, r in balancer.routers]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()  # the post-step hook moves the bias with this step's expert loads
    moved = [r.e_score_correction_bias - b for (_, r), b in zip(balancer.routers, before)]
    assert all(torch.allclose(d.abs(), torch.full_like(d, 1e-3)) | (d == 0).all() for d in moved)
    assert any((d != 0).any() for d in moved)
    assert balancer.last_update_stats["moe_max_load_over_mean"] > 1.0


def test_frozen_llm_keeps_its_routing_bias():
    torch.manual_seed(0)
    model, report = build_model(_stage("stage1"))
    assert model.moe_balancer is None  # stage1 trains adapter + audio rows: routers stay as they are
    _, stats = model.compute_loss(_batch(model))
    assert "moe_aux_loss" not in stats
