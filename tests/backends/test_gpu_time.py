"""
Tests for L{ollamaproxy.backends.gpu_time}: what a request costs the GPU,
in seconds, and the rates learned per model.
"""

from __future__ import annotations

import pytest

from ollamaproxy.backends.gpu_time import (
    FALLBACK_OUTPUT_SECONDS,
    FALLBACK_PROMPT_SECONDS,
    SMOOTHING,
    GpuTime,
)
from ollamaproxy.exchange import StreamSummary

MODEL = "llama3.2:latest"


def measured(prompt: int = 100, prompt_seconds: float = 0.5, output: int = 50,
             eval_seconds: float = 2.5) -> StreamSummary:
    """
    A reading of Ollama's final object, with its durations.
    """
    return StreamSummary(MODEL, prompt_tokens=prompt, completion_tokens=output,
                         prompt_seconds=prompt_seconds, eval_seconds=eval_seconds)


def test_an_unmeasured_model_is_estimated_at_the_fallback_rates() -> None:
    """
    Before any reading of a model has reported durations, its requests are
    estimated at the fallback seconds per prompt and per output token,
    whose ratio is a GPU's (an output token about 35 prompt tokens).
    """
    gpu = GpuTime()
    assert gpu.estimate(MODEL, 1000, 100) == pytest.approx(
        1000 * FALLBACK_PROMPT_SECONDS + 100 * FALLBACK_OUTPUT_SECONDS)
    assert 30 < FALLBACK_OUTPUT_SECONDS / FALLBACK_PROMPT_SECONDS < 40


def test_a_reading_with_durations_costs_them_and_sets_the_rates() -> None:
    """
    A reading that carries Ollama's durations costs their sum, and sets its
    model's rates (seconds over tokens), which the next estimate uses;
    another model keeps the fallback rates.
    """
    gpu = GpuTime()
    assert gpu.cost(MODEL, measured()) == pytest.approx(3.0)
    assert gpu.estimate(MODEL, 1000, 100) == pytest.approx(1000 * 0.005 + 100 * 0.05)
    assert gpu.estimate("mistral:latest", 1000, 100) == pytest.approx(
        1000 * FALLBACK_PROMPT_SECONDS + 100 * FALLBACK_OUTPUT_SECONDS)


def test_the_rates_are_a_moving_average() -> None:
    """
    Each later reading moves its model's rates by L{SMOOTHING} of the way
    to what it measured.
    """
    gpu = GpuTime()
    gpu.cost(MODEL, measured())
    gpu.cost(MODEL, measured(prompt_seconds=1.0, eval_seconds=5.0))
    prompt = 0.005 + SMOOTHING * (0.01 - 0.005)
    output = 0.05 + SMOOTHING * (0.1 - 0.05)
    assert gpu.estimate(MODEL, 1000, 100) == pytest.approx(1000 * prompt + 100 * output)


def test_a_cached_prompt_costs_what_was_evaluated() -> None:
    """
    A prompt that mostly found a slot's cache costs the seconds Ollama spent
    on the rest (its C{prompt_eval_duration}), not its tokens at the rate.
    """
    gpu = GpuTime()
    gpu.cost(MODEL, measured())
    cached = measured(prompt=4000, prompt_seconds=0.01, output=10, eval_seconds=0.5)
    assert gpu.cost(MODEL, cached) == pytest.approx(0.51)


def test_a_reading_without_durations_is_charged_at_the_measured_rates() -> None:
    """
    A C{/v1} answer (tokens, no durations) and a stream cut short (pieces
    counted, the prompt estimated) cost their tokens at the model's
    measured rates, and measure nothing.
    """
    gpu = GpuTime()
    gpu.cost(MODEL, measured())
    openai = StreamSummary(MODEL, prompt_tokens=30, completion_tokens=20)
    assert gpu.cost(MODEL, openai) == pytest.approx(30 * 0.005 + 20 * 0.05)
    cut = StreamSummary(MODEL, prompt_tokens=40, completion_tokens=7, counted=True,
                        prompt_estimated=True)
    assert gpu.cost(MODEL, cut) == pytest.approx(40 * 0.005 + 7 * 0.05)
    assert gpu.estimate(MODEL, 1000, 100) == pytest.approx(1000 * 0.005 + 100 * 0.05)


def test_an_embedding_is_charged_its_prompt_at_the_fallback_rate() -> None:
    """
    An embedding's reading (C{prompt_eval_count}, no duration) of a model
    not measured costs its prompt at the fallback rate: not nothing.
    """
    gpu = GpuTime()
    embedding = StreamSummary("nomic-embed-text:latest", prompt_tokens=500)
    assert gpu.cost("nomic-embed-text:latest", embedding) == pytest.approx(
        500 * FALLBACK_PROMPT_SECONDS)


def test_a_request_costs_at_least_one_output_token() -> None:
    """
    A request that used nothing (no reading) or next to nothing costs one
    output token at its model's rate: no request is a free turn.
    """
    gpu = GpuTime()
    assert gpu.cost(MODEL, None) == FALLBACK_OUTPUT_SECONDS
    assert gpu.estimate(MODEL, 0, 0) == FALLBACK_OUTPUT_SECONDS
    gpu.cost(MODEL, measured())
    assert gpu.cost(MODEL, None) == pytest.approx(0.05)
    assert gpu.cost(MODEL, measured(prompt=1, prompt_seconds=0.001, output=0,
                                    eval_seconds=0.0)) == pytest.approx(0.05)


def test_the_models_remembered_are_bounded() -> None:
    """
    Beyond the models it remembers, the rates start afresh: a client that
    names a new model each request cannot grow them without bound.
    """
    gpu = GpuTime(models=2)
    gpu.cost("a", measured())
    gpu.cost("b", measured())
    gpu.cost("c", measured())
    assert len(gpu._rates) == 1
    assert gpu.estimate("a", 1000, 0) == pytest.approx(1000 * FALLBACK_PROMPT_SECONDS)
