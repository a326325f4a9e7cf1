"""``deltakv-serve``: the OpenAI-compatible server, configured through Hydra like ``deltakv-eval``.

    deltakv-serve method=deltakv method.deltakv_path=runs/smoke/compressor
    deltakv-serve method=snapkv kv_budget=256 kv_cache_bytes=268435456 port=8001
    deltakv-serve model.path=/models/Qwen2.5-7B-Instruct-1M host=0.0.0.0 api_key=secret

Config: ``conf/serve.yaml`` with the ``method`` and ``model`` groups of ``deltakv-eval`` (the method's
knobs, ``kv_budget`` mapped onto its budget knob and the model config's required knobs are composed
by the same code as an evaluation run, ``benchmark.eval_runner.method_and_knobs``).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sys

from benchmark.eval_runner import CONF_DIR, ConfigError, method_and_knobs, model_ref, validate_cli

from .app import ServeSettings, build_app

log = logging.getLogger("deltakv.serve")


def _container(x):
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(x, resolve=True) if isinstance(x, (DictConfig, ListConfig)) else x


def compose(overrides: list[str] | None = None):
    """The serve config as ``deltakv-serve`` would compose it (tests, notebooks)."""
    from hydra import compose as h_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return h_compose(config_name="serve", overrides=list(overrides or []))


def engine_kwargs(cfg) -> tuple[str | None, str, dict]:
    """(model, method, LLM kwargs) of a composed serve config: engine knobs that are set, the KV
    budget, then the method's knobs."""
    method, knobs = method_and_knobs(cfg)
    kw = {k: v for k, v in (_container(cfg.get("engine")) or {}).items() if v is not None}
    if cfg.get("kv_cache_bytes") is not None:
        kw["kv_cache_bytes"] = int(cfg.kv_cache_bytes)
    clash = sorted(set(kw) & set(knobs))
    if clash:
        raise ConfigError(f"{clash} given both as engine and as method knobs")
    return model_ref(cfg), method, {**kw, **knobs}


def settings_from(cfg, model: str | None) -> ServeSettings:
    key = cfg.get("api_key") or os.environ.get("DELTAKV_API_KEY") or None
    timeout = cfg.get("request_timeout_s")
    return ServeSettings(
        served_model_name=str(cfg.get("served_model_name") or model or "smollm2-135m"),
        api_key=str(key) if key is not None else None,
        max_body_bytes=int(cfg.get("max_body_bytes", 1 << 20)),
        max_concurrent_requests=int(cfg.get("max_concurrent_requests", 64)),
        max_prompt_tokens=None if cfg.get("max_prompt_tokens") is None else int(cfg.max_prompt_tokens),
        request_timeout_s=None if timeout is None else float(timeout),
        default_max_tokens=int(cfg.get("default_max_tokens", 16)),
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_from_config(cfg):
    """(app, settings, llm) from a composed serve config; loads the model."""
    from sparse_engine import LLM

    if cfg.get("torch_threads"):
        import torch

        torch.set_num_threads(int(cfg.torch_threads))
    model, method, kw = engine_kwargs(cfg)
    settings = settings_from(cfg, model)
    settings.validate()
    llm = LLM(model, method=method, **kw)
    log.info("deltakv-serve: model=%s method=%s knobs=%s max_model_len=%d kv_budget_bytes=%d host=%s port=%s auth=%s",
             model or "smollm2-135m", method, kw, llm.max_model_len, llm.kv_budget_bytes, cfg.get("host"),
             cfg.get("port"), "on" if settings.api_key else "off")
    return build_app(llm, settings), settings, llm


def run(cfg) -> None:
    from .server import serve

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # when Hydra set none
    logging.getLogger().setLevel(str(cfg.get("log_level", "info")).upper())
    host, port = str(cfg.get("host", "127.0.0.1")), int(cfg.get("port", 8000))
    app, settings, _ = build_from_config(cfg)
    if not _is_loopback(host) and not settings.api_key:
        log.warning("listening on %s without an API key: anyone who reaches this port can use the model "
                    "(set api_key=... or DELTAKV_API_KEY)", host)
    serve(app, host=host, port=port, log_level=str(cfg.get("log_level", "info")))


def _fail(exc) -> None:
    print(f"deltakv-serve error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None


def main():
    import hydra

    if "-m" in sys.argv[1:] or "--multirun" in sys.argv[1:]:
        _fail("deltakv-serve runs one server: no -m / --multirun")
    try:  # group choices (method=, model=), method.name and kv_budget, before Hydra silently skips a bad one
        validate_cli(sys.argv[1:], multirun=False)
    except (ConfigError, FileNotFoundError, ValueError, ImportError, KeyError) as exc:
        _fail(exc)

    @hydra.main(config_path=str(CONF_DIR), config_name="serve", version_base="1.3")
    def _main(cfg):
        try:
            run(cfg)
        except (FileNotFoundError, ValueError, ImportError, KeyError, TypeError) as exc:
            _fail(exc)

    _main()


if __name__ == "__main__":
    main()
