"""serve/config.yaml is a valid `serve run` config; the builder and `moe serve` parse their settings."""
import argparse
import importlib

import pytest
import yaml

from serve.app import ServeConfig, build_app
from serve.cli import config_from_args, register


def test_config_yaml_is_a_serve_run_config_whose_builder_accepts_its_args():
    from ray.serve.schema import ServeDeploySchema

    with open("serve/config.yaml") as f:
        raw = yaml.safe_load(f)
    schema = ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(raw)
    app = schema.applications[0]
    assert schema.http_options.host == "127.0.0.1"
    module, _, name = app.import_path.partition(":")
    builder = getattr(importlib.import_module(module), name)
    assert builder is build_app
    cfg = ServeConfig.from_args(app.args)
    assert cfg.model is None and cfg.model_name() == "moeflow-default" and cfg.api_key is None
    from ray.serve import Application
    assert isinstance(builder(dict(app.args, device="cpu")), Application)


def test_serve_config_checks_and_converts():
    cfg = ServeConfig.from_args({"model": "tiny", "port": "9001", "max_tokens": "64", "replica_cpus": "0.5"})
    assert (cfg.port, cfg.limits.max_tokens, cfg.replica_cpus, cfg.model_name()) == (9001, 64, 0.5, "moeflow-tiny")
    assert cfg.replica_spec("cpu")["torch_threads"] == 1
    with pytest.raises(ValueError, match="unknown application args.*'modle'"):
        ServeConfig.from_args({"modle": "x"})
    with pytest.raises(ValueError, match="port"):
        ServeConfig(port=70000)
    with pytest.raises(ValueError, match="device"):
        ServeConfig(device="tpu")
    with pytest.raises(ValueError, match="'lots'"):
        ServeConfig(gpu_memory="lots")
    assert ServeConfig(model="/ckpts/mixtral-8x7b/").model_name() == "mixtral-8x7b"
    assert ServeConfig().replica_spec("cuda")["offload"] is None
    off = ServeConfig(gpu_memory="2GiB", offload_policy="lfu").replica_spec("cuda")["offload"]
    assert (off["gpu_memory"], off["policy"], off["device"], off["store"]) == ("2GiB", "lfu", "cuda", "memory")
    assert off["decode_batch"] == 8  # the engine's max_batch_size: driver='auto' weighs it
    # the expert backend: auto (triton on a GPU, torch on the CPU), carried to the replica
    assert ServeConfig().replica_spec("cuda")["backend"] == "auto"
    assert ServeConfig(backend="torch").replica_spec("cuda")["backend"] == "torch"
    assert ServeConfig().replica_spec("cuda")["warm_up"] is True
    assert ServeConfig(warm_up=False).replica_spec("cuda")["warm_up"] is False
    with pytest.raises(ValueError, match="backend"):
        ServeConfig(backend="cuda-magic")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        ServeConfig(backend="triton", device="cpu")
    assert ServeConfig(gpu_memory="2GiB", max_batch_size=2).replica_spec("cuda")["offload"]["decode_batch"] == 2
    with pytest.raises(ValueError, match="policy"):
        ServeConfig(gpu_memory="2GiB", offload_policy="random")


def test_moe_serve_command_line():
    parser = argparse.ArgumentParser(prog="moe")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve"])
    cfg = config_from_args(args)
    assert (cfg.host, cfg.port, cfg.model, cfg.gpu_memory) == ("127.0.0.1", 8000, None, None)
    args = parser.parse_args(["serve", "tiny", "--host", "0.0.0.0", "--port", "9000", "--api-key", "k",
                              "--gpu-memory", "8GiB", "--max-concurrency", "4", "--max-tokens", "32"])
    cfg = config_from_args(args)
    assert (cfg.model, cfg.host, cfg.port, cfg.api_key, cfg.gpu_memory) == ("tiny", "0.0.0.0", 9000, "k", "8GiB")
    assert (cfg.limits.max_concurrency, cfg.limits.max_tokens) == (4, 32)
    assert cfg.warm_up is True and config_from_args(parser.parse_args(["serve", "--no-warm-up"])).warm_up is False
    args = parser.parse_args(["serve", "--gpu-memory", "0.3", "--offload-policy", "lfu", "--cpu-fallback"])
    off = config_from_args(args).replica_spec("cuda")["offload"]
    assert (off["gpu_memory"], off["policy"], off["cpu_fallback"]) == ("0.3", "lfu", True)
    assert "expert_slices" not in off  # the default: whole experts
    args = parser.parse_args(["serve", "--gpu-memory", "0.3", "--cpu-fallback", "--expert-slices", "4"])
    assert config_from_args(args).replica_spec("cuda")["offload"]["expert_slices"] == 4
    args = parser.parse_args(["serve", "--gpu-memory", "0.3", "--offload-policy", "lfu", "--offload-lfu-half-life", "1"])
    assert config_from_args(args).replica_spec("cuda")["offload"]["lfu_half_life"] == 1.0
    args = parser.parse_args(["serve", "--gpu-memory", "0.3", "--offload-driver", "device"])
    assert config_from_args(args).replica_spec("cuda")["offload"]["driver"] == "device"
    args = parser.parse_args(["serve", "--gpu-memory", "0.3", "--offload-reserve", "1GiB"])
    assert config_from_args(args).replica_spec("cuda")["offload"]["reserve_bytes"] == "1GiB"
    with pytest.raises(ValueError, match="needs gpu_memory"):  # like the other offload options: needs offloading
        config_from_args(parser.parse_args(["serve", "--offload-reserve", "1GiB"]))
    # the same from serve/config.yaml's args (offload_options: {driver: device})
    yaml_cfg = ServeConfig.from_args({"gpu_memory": "0.3", "offload_options": {"driver": "device"}})
    assert yaml_cfg.replica_spec("cuda")["offload"]["driver"] == "device"
    with pytest.raises(ValueError, match="driver='device'"):  # offload's own check: no CPU fallback there
        config_from_args(parser.parse_args(["serve", "--gpu-memory", "0.3", "--offload-driver", "device",
                                            "--cpu-fallback"]))
    args = parser.parse_args(["serve", "--gpu-memory", "0.3", "--offload-pack-experts"])
    assert config_from_args(args).replica_spec("cuda")["offload"]["pack_experts"] is True
    with pytest.raises(ValueError, match="pack_experts"):  # offload's own check, when the config is made
        config_from_args(parser.parse_args(["serve", "--gpu-memory", "0.3", "--offload-pack-experts", "--cpu-fallback"]))
    assert callable(args.func)
    # the file options reach the config (they were dropped before session 13), and need offloading
    args = parser.parse_args(["serve", "--offload-prefetch", "probe", "--offload-probes", "p.probe.npz"])
    with pytest.raises(ValueError, match="offload_probes file 'p.probe.npz' not found"):
        config_from_args(args)
    args = parser.parse_args(["serve", "--offload-prefetch", "probe"])
    with pytest.raises(ValueError, match="offload_prefetch set without offloading"):
        config_from_args(args)
    args = parser.parse_args(["serve", "--gpu-memory", "0.3", "--offload-prefetch", "probe"])
    with pytest.raises(ValueError, match="go together"):
        config_from_args(args)


def test_moe_serve_refuses_a_byte_budget_too_small_before_ray_starts(monkeypatch):
    """moe serve --gpu-memory 1MiB: refused from the model's shapes before Ray starts (run_server is never
    reached), naming the numbers; a fraction is left to the replica's own GPU (the model is not even read here)."""
    import moe.checkpoint
    import serve.app
    from serve.cli import run
    parser = argparse.ArgumentParser(prog="moe")
    register(parser.add_subparsers(dest="command"))
    monkeypatch.setattr(serve.app, "run_server", lambda *a, **k: pytest.fail("Ray was started"))
    with pytest.raises(ValueError, match=r"gpu_memory='1MiB' cannot hold one layer's 2 active experts.*KV cache"):
        run(parser.parse_args(["serve", "tiny", "--device", "cpu", "--gpu-memory", "1MiB"]))
    monkeypatch.setattr(moe.checkpoint, "model_skeleton", lambda *a, **k: pytest.fail("the model was read"))
    serve.app.check_offload_budget(config_from_args(parser.parse_args(["serve", "tiny", "--gpu-memory", "0.3"])))
    serve.app.check_offload_budget(config_from_args(parser.parse_args(["serve", "tiny"])))  # no offloading
