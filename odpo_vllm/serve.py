"""`python -m odpo_vllm.serve --model PATH_OR_HUB_ID`: a vLLM server that trainers attach to
with `OnlineDPOConfig(vllm_mode="server")` (the reference's `trl vllm-serve`).

One `VLLMGenerator` (the engine every placement samples with) behind a small HTTP front. Like
every engine here it starts from the model's config with dummy weights and serves only what a
trainer sends: a trainer attaches (`/attach`: its weights' names and shapes are checked against
the served architecture, its sampling settings and EOS ids are taken), opens the weight transport
(`/init_weight_transfer_engine`), pushes every step over it (`/start_weight_update`,
`/update_weights`, `/finish_weight_update`, then `/set_version`), samples (`/generate`), probes
(`/logprobs`) and closes the transport (`/close_communicator`). The server keeps running for the
next trainer. HTTP carries control only: the weight bytes go over our gloo backend (CPU) or vLLM's
NCCL (GPUs), as under the Ray placements (`weights/wire.py`).

Requests run one at a time on the engine (a lock), apart from `/health`, which answers at once.
One trainer at a time: each attach starts a session, and a call from an earlier session (a
trainer another one took the server from) is refused, except its `/close_communicator`, which
then has nothing left to close, and `/logprobs`, which changes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

logger = logging.getLogger("odpo_vllm.serve")


class SessionEnded(RuntimeError):
    """A call from a trainer that another trainer took the server from."""


@dataclass
class ServedSettings:
    """What `VLLMGenerator` reads from a run's `OnlineDPOConfig`: the server's flags, and the
    attached trainer's sampling settings."""

    use_cpu: bool = False
    bf16: bool = False
    fp16: bool = False
    seed: int = 0
    vllm_enable_sleep_mode: bool = False
    vllm_enforce_eager: bool | None = None
    vllm_tensor_parallel_size: int = 1
    vllm_gpu_memory_utilization: float = 0.9
    vllm_kv_cache_memory_bytes: int | None = None
    vllm_model_impl: str = "vllm"
    trust_remote_code: bool = False
    vllm_structured_outputs_regex: str | None = None
    sampling: dict = field(default_factory=dict)

    def sampling_settings(self) -> dict:
        return dict(self.sampling)


class EngineService:
    """The engine and what the attached trainer set; every method runs under `lock`."""

    def __init__(self, options: argparse.Namespace):
        import torch
        from transformers import AutoConfig, AutoTokenizer

        from odpo_vllm.learning.models import context_length
        from odpo_vllm.sampling.vllm_engine import VLLMGenerator
        from odpo_vllm.weights.wire import GLOO_BACKEND

        self.lock = threading.Lock()
        self.model = options.model
        config = AutoConfig.from_pretrained(options.model, trust_remote_code=options.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(options.model, trust_remote_code=options.trust_remote_code)
        on_gpu = torch.cuda.is_available() and not options.use_cpu
        dtype = options.dtype if options.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
        self.settings = ServedSettings(
            use_cpu=options.use_cpu, bf16=dtype == "bfloat16", fp16=dtype == "float16", seed=options.seed,
            vllm_enforce_eager=options.enforce_eager or None, vllm_tensor_parallel_size=options.tensor_parallel_size,
            vllm_gpu_memory_utilization=options.gpu_memory_utilization,
            vllm_kv_cache_memory_bytes=options.kv_cache_memory_bytes, vllm_model_impl=options.model_impl,
            trust_remote_code=options.trust_remote_code)
        self.max_model_len = options.max_model_len or context_length(config)
        self.transport = options.weight_transport if options.weight_transport != "auto" else (
            "nccl" if on_gpu else GLOO_BACKEND)
        self.architectures = list(config.architectures or [])
        self.engine = VLLMGenerator(config, tokenizer, self.settings, set(), self.max_model_len,
                                    name=f"vLLM server ({options.model})", weight_transfer_backend=self.transport)
        self.transport_open = False
        self.attached = 0  # trainers attached so far; the latest one's session is this number

    # ---------------------------------------------------------------- calls
    def health(self, _: dict) -> dict:
        return {"status": "ok", "model": self.model, "architectures": self.architectures,
                "dtype": str(self.engine.dtype).split(".")[-1], "max_model_len": self.max_model_len,
                "weight_transport": self.transport, "workers": self.settings.vllm_tensor_parallel_size,
                "policy_version": self.engine.policy_version, "attached": self.attached}

    def attach(self, request: dict) -> dict:
        """A trainer attaches: refused (ValueError, which the trainer raises) unless its policy is
        the served architecture with the same weight names and shapes, and its context fits."""
        import torch

        from odpo_vllm.weights.names import TensorMeta, validate_weights

        architectures = request.get("architectures") or []
        if architectures and self.architectures and architectures != self.architectures:
            raise ValueError(f"the trainer's model is {architectures}, the server serves {self.architectures} "
                             f"({self.model}): start the server with the trainer's model")
        metas = [TensorMeta(name, getattr(torch, dtype), tuple(shape)) for name, dtype, shape in request["weights"]]
        try:
            validate_weights(metas, self.engine.expected, self.engine.name)
        except ValueError as err:
            raise ValueError(f"the trainer's model does not match the served model {self.model}: {err}") from None
        if request["max_model_len"] > self.max_model_len:
            raise ValueError(f"the trainer needs a context of {request['max_model_len']} tokens, the server serves "
                             f"{self.max_model_len}: restart it with --max-model-len {request['max_model_len']}")
        self._close_transport()  # a trainer that ended without closing its side
        self.engine.args = dataclasses.replace(self.settings, sampling=dict(request["sampling"]),
                                               vllm_structured_outputs_regex=request.get("structured_outputs_regex"))
        self.engine.eos_token_ids = set(request["eos_token_ids"])
        self.engine.policy_version = -1  # nothing is sampled before this trainer's weights arrive
        self.engine.restart_idle_clock()
        self.attached += 1
        return dict(self.health({}), session=self.attached)

    def check_session(self, path: str, request: dict) -> bool:
        """Whether the call comes from the attached trainer; False for a `/close_communicator` of
        an earlier one (nothing of it is left), a `SessionEnded` error for any other call of it."""
        if request.get("session") == self.attached or path == "logprobs":  # (read-only: anyone may probe)
            return True
        if path == "close_communicator":
            return False
        raise SessionEnded(f"/{path}: another trainer attached to this server since (session {self.attached}, this "
                           f"call's {request.get('session')}); one trainer at a time")

    def init_weight_transfer_engine(self, request: dict) -> dict:
        self._close_transport()
        self.engine.init_weight_transfer_engine({"init_info": request["init_info"]})
        self.transport_open = True
        return {}

    def start_weight_update(self, _: dict) -> dict:
        self.engine.start_weight_update()
        return {}

    def update_weights(self, request: dict) -> dict:
        self.engine.update_weights({"update_info": request["update_info"]})
        return {}

    def finish_weight_update(self, _: dict) -> dict:
        self.engine.finish_weight_update()
        return {}

    def close_communicator(self, _: dict) -> dict:
        self._close_transport()
        return {}

    def _close_transport(self) -> None:
        if self.transport_open:
            self.transport_open = False
            self.engine.shutdown_weight_transfer_engine()

    def set_version(self, request: dict) -> dict:
        self.engine.set_policy_version(int(request["version"]))
        return {}

    def generate(self, request: dict) -> dict:
        from odpo_vllm.sampling.server_client import rollouts_to_json

        rollouts = self.engine.generate(request["prompt_ids"], int(request["num_samples"]), int(request["seed"]))
        return rollouts_to_json(rollouts)

    def logprobs(self, request: dict) -> dict:
        return {"logprobs": self.engine.sequence_logprobs(request["token_ids"]).tolist()}

    def close(self) -> None:
        self._close_transport()
        self.engine.close()


ROUTES = ("attach", "init_weight_transfer_engine", "start_weight_update", "update_weights", "finish_weight_update",
          "close_communicator", "set_version", "generate", "logprobs")


def make_handler(service: EngineService):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self) -> None:
            path = self.path.strip("/").split("?")[0]
            length = int(self.headers.get("Content-Length") or 0)
            try:
                request = json.loads(self.rfile.read(length) or b"{}") if length else {}
                if path == "health":
                    self._answer(200, service.health(request))
                    return
                if path not in ROUTES:
                    self._answer(404, {"error": f"no endpoint /{path}"})
                    return
                with service.lock:
                    live = path == "attach" or service.check_session(path, request)
                    self._answer(200, getattr(service, path)(request) if live else {})
            except ValueError as err:  # the trainer's request is refused: it says why
                self._answer(400, {"error": str(err)})
            except SessionEnded as err:
                self._answer(409, {"error": str(err)})
            except Exception as err:
                logger.debug("/%s failed", path, exc_info=True)
                self._answer(500, {"error": f"{type(err).__name__}: {err}"})

        do_GET = do_POST = _route

        def log_message(self, format, *args) -> None:  # one line per request only when asked
            logger.debug("%s " + format, self.address_string(), *args)

    return Handler


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m odpo_vllm.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the policy's path or hub id (its config and tokenizer)")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="auto: bfloat16 on a GPU, float32 on CPU")
    parser.add_argument("--max-model-len", type=int, default=None, help="default: the model's context length")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    parser.add_argument("--weight-transport", default="auto", choices=("auto", "odpo_gloo", "nccl"),
                        help="auto: nccl on a GPU, odpo_gloo on CPU")
    parser.add_argument("--model-impl", default="vllm", choices=("vllm", "transformers"))
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--use-cpu", action="store_true", help="run on CPU even where a GPU is visible")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-level", default="passive", help="passive (quiet), warning, info or debug")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from odpo_vllm.primitives.console import configure_logging

    options = parse_args(argv)
    configure_logging(options.log_level)  # before vLLM is imported: its INFO chatter only when asked
    try:  # the port is taken before the engine starts: a busy one fails in a second, not after the start
        httpd = ThreadingHTTPServer((options.host, options.port), None)
    except OSError as err:
        sys.exit(f"odpo_vllm.serve: cannot listen on {options.host}:{options.port} ({err}); pick another --port")
    httpd.daemon_threads = True
    service = EngineService(options)
    httpd.RequestHandlerClass = make_handler(service)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=httpd.shutdown, daemon=True).start())
    print(f"odpo_vllm.serve: {options.model} ready at http://{options.host}:{options.port} "
          f"(weights over {service.transport})", flush=True)
    try:
        httpd.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        service.close()


if __name__ == "__main__":
    sys.exit(main())
