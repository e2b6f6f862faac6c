"""Which part of the model each rank holds, without starting any process."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from herd.config import parse_config
from herd.parallel.loading import ShardPlan
from herd.parallel.sizes import ParallelConfigError, Shard, check_size, valid_sizes

FIXTURES = Path(__file__).parent.parent / "fixtures" / "configs"


def _maverick():
    return parse_config(json.loads((FIXTURES / "maverick_published.json").read_text())).text


def test_maverick_sizes():
    cfg = _maverick()
    assert valid_sizes(cfg, expert_parallel=False, limit=64) == [1, 2, 4, 8]
    assert valid_sizes(cfg, expert_parallel=True, limit=64) == [1, 2, 4, 8]
    with pytest.raises(ParallelConfigError, match=r"40 attention heads.*valid sizes \(tensor parallel\): 1, 2, 4, 8"):
        check_size(cfg, 16, expert_parallel=False)


def test_maverick_tp8_holds_one_kv_head_and_16_experts():
    cfg = _maverick()
    shard = Shard(5, 8, expert_parallel=True)
    assert shard.heads(cfg) == range(25, 30)
    assert shard.kv_heads(cfg) == range(5, 6)
    assert shard.experts(cfg) == range(80, 96)
    assert shard.vocab_rows(cfg.vocab_size) == range(5 * 25256, 6 * 25256)
    local = shard.local_text_config(cfg)
    assert (local.num_attention_heads, local.num_key_value_heads, local.intermediate_size_mlp) == (5, 1, 2048)


def test_kv_heads_replicated_past_their_count():
    cfg = _maverick()
    assert [Shard(r, 16).kv_heads(cfg) for r in (0, 1, 2, 15)] == [range(0, 1), range(0, 1), range(1, 2), range(7, 8)]


def test_reader_cuts_rows_columns_halves_and_pads(tmp_path):
    cfg = parse_config({"architectures": ["Llama4ForCausalLM"], "vocab_size": 10, "hidden_size": 4,
                        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 2,
                        "intermediate_size": 4, "intermediate_size_mlp": 6, "num_local_experts": 2,
                        "num_hidden_layers": 1, "interleave_moe_layer_step": 1}).text
    tensors = {
        "embed": torch.arange(40.0).reshape(10, 4),
        "gate_up": torch.arange(2 * 4 * 8.0).reshape(2, 4, 8),
        "o": torch.arange(16.0).reshape(4, 4),
    }
    save_file(tensors, tmp_path / "t.safetensors")
    handle = safe_open(str(tmp_path / "t.safetensors"), framework="pt")
    plan = ShardPlan(cfg, Shard(2, 3))
    embed = plan.reader(handle, "embed", tmp_path, "embed_tokens.weight")
    # 10 rows over 3 ranks: 4 each, the last rank's last two are padding.
    assert embed.shape == (4, 4)
    assert torch.equal(embed(), torch.cat([tensors["embed"][8:], torch.zeros(2, 4)]))
    plan = ShardPlan(cfg, Shard(1, 2))
    gate_up = plan.reader(handle, "gate_up", tmp_path, "layers.0.feed_forward.experts.gate_up_proj")
    want = torch.cat([tensors["gate_up"][:, :, 2:4], tensors["gate_up"][:, :, 6:8]], dim=2)
    assert gate_up.shape == (2, 4, 4) and torch.equal(gate_up(), want)
    assert torch.equal(gate_up.expert(1), want[1])
    o = plan.reader(handle, "o", tmp_path, "layers.0.self_attn.o_proj.weight")
    assert torch.equal(o(), tensors["o"][:, 2:4])
    ep = ShardPlan(cfg, Shard(1, 2, expert_parallel=True))
    assert ep.local_name("layers.0.feed_forward.experts.0.up_proj.weight") is None
    assert ep.local_name("layers.0.feed_forward.experts.1.up_proj.weight") == "layers.0.feed_forward.experts.0.up_proj.weight"
    fused = ep.reader(handle, "gate_up", tmp_path, "layers.0.feed_forward.experts.gate_up_proj")
    assert torch.equal(fused(), tensors["gate_up"][1:]) and torch.equal(fused.expert(0), tensors["gate_up"][1])


def test_node_layouts_and_port_in_use():
    import socket
    from types import SimpleNamespace

    from herd.parallel.nodes import layout_from

    def options(**kw):
        return SimpleNamespace(**{"tensor_parallel_size": 8, "nnodes": 2, "node_rank": 0, "master_addr": "127.0.0.1",
                                  "master_port": None, **kw})

    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match=f"--master-port {port} cannot be used"):
            layout_from(options(master_port=port), None)
        # Node 1 does not listen: its ranks 4..7 connect to node 0.
        node1 = layout_from(options(node_rank=1, master_port=port), None)
    assert list(node1.ranks_to_start()) == [4, 5, 6, 7] and node1.local_rank_of(6) == 2
    with pytest.raises(ValueError, match="needs --master-port"):
        layout_from(options(), None)
    with pytest.raises(ValueError, match="does not split evenly over 3 nodes"):
        layout_from(options(nnodes=3, master_port=1), None)
    single = layout_from(options(nnodes=1, tensor_parallel_size=4), lambda: 12345)
    assert list(single.ranks_to_start()) == [1, 2, 3] and single.endpoint.master_port == 12345
