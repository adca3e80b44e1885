"""The trainer's side of `vllm_mode="server"`: a vLLM server started by the user
(`python -m odpo_vllm.serve --model ...`, see `odpo_vllm/serve.py`) used as the run's generator.

HTTP carries control only (JSON: prompt ids in, completion ids out, the weight-update handshake,
the sync probe); the weights travel over the same wire as under the Ray placements (our gloo
backend on CPU, vLLM's NCCL between GPUs), opened by the weight publisher
(`runtime/publisher.py`, `ServerWeightPublisher`).

- `ServerClient`: one JSON call per endpoint, each bounded by a timeout and failing with an error
  that names the server, the call and what to do.
- `ServerWeightSyncClient`: vLLM's weight-sync client protocol (the four calls a trainer-side
  transfer engine makes) over that client.
- `ServerGenerator`: the generator role (`submit`, `generate`, `drain`, `recover`, `close`).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import Future, wait

import torch

from odpo_vllm.core.batches import Rollouts
from odpo_vllm.primitives.preemption import StopWaiting

logger = logging.getLogger(__name__)

START_HINT = "start it with `python -m odpo_vllm.serve --model <the policy's path or hub id>`"
HEALTH_POLL_S = 0.5


class ServerError(RuntimeError):
    """The server answered a call with an error (its message is the server's)."""


class ServerGone(ConnectionError):
    """The server did not answer at all (not started, stopped, or unreachable)."""


def server_url(args) -> str:
    """`vllm_server_base_url`, else http://{vllm_server_host}:{vllm_server_port}, without a trailing /."""
    url = args.vllm_server_base_url or f"http://{args.vllm_server_host}:{args.vllm_server_port}"
    return url.rstrip("/")


def check_url(url: str) -> str | None:
    """Why `url` cannot be a server's base URL, or None."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https"):
        return f"{url!r} must start with http:// or https://"
    if not parsed.hostname:
        return f"{url!r} names no host"
    try:
        parsed.port  # noqa: B018 (raises on a port that is not a number in 0-65535)
    except ValueError as err:
        return f"{url!r}: {err}"
    return None


class ServerClient:
    """JSON over HTTP to one server at `url`; `timeout_s` bounds every call that does not set its own."""

    def __init__(self, url: str, timeout_s: float):
        self.url, self.timeout_s = url.rstrip("/"), timeout_s
        # straight to the server: an HTTP(S)_PROXY set for downloads must not route the run's control calls
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.session: int | None = None  # given by /attach, sent with every later call

    def attach(self, request: dict) -> dict:
        """Attach this trainer (the server checks its model); the server's answer."""
        answer = self.call("attach", request)
        self.session = answer["session"]
        return answer

    def call(self, path: str, payload: dict | None = None, timeout_s: float | None = None,
             method: str = "POST") -> dict:
        timeout_s = timeout_s or self.timeout_s
        data = json.dumps(dict(payload or {}, session=self.session)).encode() if method == "POST" else None
        request = urllib.request.Request(f"{self.url}/{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with self.opener.open(request, timeout=timeout_s) as response:
                body = response.read()
            try:
                answer = json.loads(body or b"{}")
            except ValueError:
                answer = None
            if not isinstance(answer, dict):
                raise ServerError(f"the server at {self.url} answered /{path} with something other than "
                                  f"odpo_vllm.serve's JSON ({body[:100]!r}): {START_HINT}")
            return answer
        except urllib.error.HTTPError as err:  # the server answered with an error
            try:
                message = json.loads(err.read()).get("error", "")
            except Exception:  # not our server's JSON
                message = str(err)
            kind = ValueError if err.code == 400 else ServerError
            raise kind(f"vLLM server at {self.url}: /{path} failed: {message}") from None
        except (TimeoutError, socket.timeout) as err:
            raise TimeoutError(f"vLLM server at {self.url} did not answer /{path} within {timeout_s:.0f}s "
                               "(ray_timeout_s bounds sampling and weight pushes, vllm_server_timeout the rest)") from err
        except (urllib.error.URLError, ConnectionError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ServerGone(f"vLLM server at {self.url} did not answer /{path} ({reason}); server mode does not "
                             f"restart a server: {START_HINT}, and resume from the last checkpoint") from err

    def health(self, timeout_s: float = 5.0) -> dict:
        """The server's state; a `ServerError` if the server is not `odpo_vllm.serve` (a `trl
        vllm-serve`, say, which moves weights its own way)."""
        answer = self.call("health", timeout_s=timeout_s, method="GET")
        if "weight_transport" not in answer:
            raise ServerError(f"the server at {self.url} is not odpo_vllm.serve (its /health says {answer}): "
                              f"{START_HINT}")
        return answer

    def wait_for_health(self, timeout_s: float) -> dict:
        """The server's /health answer, waiting up to `timeout_s` for it to come up."""
        deadline, last = time.monotonic() + timeout_s, None
        while True:
            try:
                return self.health(timeout_s=max(min(5.0, deadline - time.monotonic()), 0.5))
            except (ServerGone, TimeoutError) as err:
                last = err
            if time.monotonic() >= deadline:
                break
            time.sleep(HEALTH_POLL_S)
        raise TimeoutError(f"no vLLM server answered at {self.url} within {timeout_s:.0f}s (vllm_server_timeout): "
                           f"{START_HINT} ({last})")

    def local_address(self) -> str:
        """This host's address on the route to the server: where the server's side of the weight
        transport finds the trainer's."""
        parsed = urllib.parse.urlparse(self.url)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((parsed.hostname, parsed.port or 80))  # UDP: nothing is sent
            return probe.getsockname()[0]


class ServerWeightSyncClient:
    """vLLM's weight-sync client protocol over `ServerClient`: what a trainer-side transfer engine
    (`vllm_backend.open_trainer_transport`) calls while it sends; `timeout_s` bounds each call."""

    def __init__(self, client: ServerClient, timeout_s: float):
        self.client, self.timeout_s = client, timeout_s

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.client.call("init_weight_transfer_engine", {"init_info": init_info}, self.timeout_s)

    def start_weight_update(self) -> None:
        self.client.call("start_weight_update", timeout_s=self.timeout_s)

    def update_weights(self, update_info: dict) -> None:
        self.client.call("update_weights", {"update_info": update_info}, self.timeout_s)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.client.call("finish_weight_update", timeout_s=self.timeout_s)

    def shutdown_weight_transfer_engine(self, timeout_s: float | None = None) -> None:
        self.client.call("close_communicator", timeout_s=timeout_s or self.timeout_s)


def rollouts_from_json(answer: dict, prompt_ids: list[list[int]], num_samples: int) -> Rollouts:
    return Rollouts(prompt_ids, answer["completion_ids"], torch.tensor(answer["contains_eos"], dtype=torch.bool),
                    num_samples, int(answer["policy_version"]), engine_idle_s=float(answer["engine_idle_s"]),
                    sample_s=float(answer["sample_s"]))


def rollouts_to_json(rollouts: Rollouts) -> dict:
    return {"completion_ids": rollouts.completion_ids, "contains_eos": rollouts.contains_eos.tolist(),
            "policy_version": rollouts.policy_version, "engine_idle_s": rollouts.engine_idle_s,
            "sample_s": rollouts.sample_s}


class ServerRollouts:
    """Rollouts the server is sampling (the HTTP call runs in a thread of its own)."""

    def __init__(self, future: Future):
        self.future = future

    def result(self) -> Rollouts:
        return self.future.result()


class ServerGenerator:
    """The server used as the run's generator. Each `submit` is one /generate call in a thread of
    its own, so the server samples while this process scores or trains; `drain` waits for all of
    them before a weight push."""

    def __init__(self, client: ServerClient, timeout_s: float, dtype: torch.dtype, name: str):
        self.client, self.timeout_s, self.dtype, self.name = client, timeout_s, dtype, name
        self.lock = threading.Lock()
        self.in_flight: list[Future] = []

    def submit(self, prompt_ids: list[list[int]], num_samples: int, seed: int) -> ServerRollouts:
        """Calls in flight together may reach the server in any order: each has its own seed and
        all of them are sampled with the version published before (`drain` precedes a push), so
        the order changes nothing."""
        from odpo_vllm.weights.wire import in_daemon_thread

        def sample() -> Rollouts:
            answer = self.client.call("generate", {"prompt_ids": prompt_ids, "num_samples": num_samples,
                                                   "seed": seed}, self.timeout_s)
            return rollouts_from_json(answer, prompt_ids, num_samples)

        future = in_daemon_thread(sample)
        with self.lock:
            self.in_flight = [f for f in self.in_flight if not f.done()] + [future]
        return ServerRollouts(future)

    def generate(self, prompt_ids: list[list[int]], num_samples: int, seed: int) -> Rollouts:
        return self.submit(prompt_ids, num_samples, seed).result()

    def drain(self, stop: list | None = None) -> None:
        """Before a weight push: every /generate call answered (an update must not overtake one).
        A stop signal in `stop` ends the wait (`StopWaiting`)."""
        with self.lock:
            pending = list(self.in_flight)
        while pending:
            if stop:
                raise StopWaiting()
            _, still = wait(pending, timeout=0.2)
            pending = list(still)
        with self.lock:
            self.in_flight = [f for f in self.in_flight if not f.done()]

    def recover(self) -> None:
        """Nothing to replace: a server that stops answering fails the call that found it."""

    def close(self) -> None:
        """The server keeps running (another run may attach); nothing of this run's is left on it
        once the publisher closed the weight transport."""
