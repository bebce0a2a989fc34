# -*- test-case-name: tests.backends.test_gpu_time -*-
"""
What a request costs the GPU, in seconds: the fair queue's cost under
C{--fair-share gpu-time} (L{ollamaproxy.backends.router}).

On an Ollama GPU a generated token costs far more than a prompt token: the
prompt is evaluated many tokens in one pass (thousands a second), while
each output token takes a pass of its own (tens a second per slot).  A
fixed weight between the two (C{--fair-share tokens}) is right for one
model on one card at one load only; the seconds Ollama reports are right
for all of them.  So a request that has ended costs what its meter's
reading says Ollama spent on it: C{prompt_eval_duration} (only the part of
the prompt not found in a slot's cache, so that a conversation that finds
its cache costs less, as it does the GPU) plus C{eval_duration} (the
decode).  The model's load (C{load_duration}) is not charged: it is the
backend's switch, and which request happens to trigger it is not the
requester's doing.

Where a reading lacks a duration (a C{/v1} answer, which reports tokens
only; a stream cut before Ollama's final object; an embedding, whose
answer has C{prompt_eval_count} but no duration), that part is charged as
its tokens times the model's measured seconds per token.  The estimate a
request is charged when it gets its slot (what decides the order while it
runs) is reckoned the same way, from the tokens its plan expects.  The
rates are learned from the readings that carry durations: for each model,
a moving average (the newest reading weighs L{SMOOTHING}) of the seconds
per prompt token as sent (C{prompt_eval_duration} over
C{prompt_eval_count}: cache hits included, so that the estimate expects
the cache as often as it is found) and of the seconds per output token
(C{eval_duration} over C{eval_count}: at the load the decode ran under,
as slots busy together slow each other).  A model not yet measured uses
L{FALLBACK_PROMPT_SECONDS} and L{FALLBACK_OUTPUT_SECONDS}.  At most
L{MODELS} models are remembered; beyond, the rates start afresh (with a
single backend, any name a client sends gets a slot).

A request costs at least one output token's seconds at its model's rate,
so that no request is a free turn (C{--fair-share tokens} charges at
least a token).
"""

from __future__ import annotations

from typing import Final

from ollamaproxy.exchange import StreamSummary

#: Seconds per prompt token of a model not yet measured: an RTX 3090's
#: prefill of an 8B Q4_K_M model, 3865.39 tokens a second (llama.cpp's
#: C{llama-bench} C{pp 1024}, XiongjieDai/GPU-Benchmarks-on-LLM-Inference),
#: the simulator's figure (bench/gpu_sim.md, "prefill rate").
FALLBACK_PROMPT_SECONDS: Final = 1 / 3865.39

#: Seconds per output token of a model not yet measured: the same card and
#: model's decode, 111.74 tokens a second with one slot busy (C{tg 1024},
#: the same table; bench/gpu_sim.md, "decode rate").  Only the ratio to
#: the prompt's rate matters while every model is unmeasured: about 35.
FALLBACK_OUTPUT_SECONDS: Final = 1 / 111.74

#: The weight of the newest reading in a model's moving averages: about
#: the last ten requests count.
SMOOTHING: Final = 0.2

#: How many models' rates are remembered.
MODELS: Final = 1024


class GpuTime:
    """
    The seconds of GPU requests cost, each model's rates learned from what
    Ollama reports (see the module's docstring).
    """

    def __init__(
        self,
        prompt_seconds: float = FALLBACK_PROMPT_SECONDS,
        output_seconds: float = FALLBACK_OUTPUT_SECONDS,
        models: int = MODELS,
    ) -> None:
        """
        @param prompt_seconds: Seconds per prompt token of a model not yet
            measured.
        @param output_seconds: Seconds per output token of a model not yet
            measured.
        @param models: How many models' rates are remembered.
        """
        self._fallback = (prompt_seconds, output_seconds)
        self._models = models
        # For each model (its canonical name) met in a reading: seconds per
        # prompt token and per output token (the fallback's until a reading
        # has said), and the weight the next reading of each has in them: 1
        # for the first, which replaces the fallback, then SMOOTHING.
        self._rates: dict[str, list[float]] = {}

    def estimate(self, model: str, prompt: int, output: int) -> float:
        """
        The seconds a request of C{model} with C{prompt} tokens that
        generates C{output} is expected to cost, at the model's rates (at
        least one output token's).
        """
        # Asked with "in" and a subscript, not dict.get(), here and in
        # cost(): no call more on every request that takes a slot
        # (tests/test_hot_path.py's budget).
        rates = self._rates[model] if model in self._rates else self._fallback
        cost = prompt * rates[0] + output * rates[1]
        return cost if cost > rates[1] else rates[1]

    def cost(self, model: str, reading: StreamSummary | None) -> float:
        """
        The seconds a request of C{model} that has ended cost, from its
        meter's C{reading} (L{None}: it used nothing): Ollama's durations
        where it reported them, else its tokens at the model's rates.  The
        durations reported move the model's rates.
        """
        if reading is None:
            return self.estimate(model, 0, 0)
        rates = self._rates[model] if model in self._rates else self._new(model)
        cost = 0.0
        spent = reading.prompt_seconds
        if spent is not None:
            cost = spent
            if reading.prompt_tokens and not reading.prompt_estimated:
                rates[0] += rates[2] * (spent / reading.prompt_tokens - rates[0])
                rates[2] = SMOOTHING
        elif reading.prompt_tokens:
            cost = reading.prompt_tokens * rates[0]
        spent = reading.eval_seconds
        if spent is not None:
            cost += spent
            if reading.completion_tokens and not reading.counted:
                rates[1] += rates[3] * (spent / reading.completion_tokens - rates[1])
                rates[3] = SMOOTHING
        else:
            cost += reading.completion_tokens * rates[1]
        return cost if cost > rates[1] else rates[1]

    def _new(self, model: str) -> list[float]:
        """
        The rates of a model seen for the first time, the fallback's until
        measured; beyond the models remembered, every rate starts afresh.
        """
        if len(self._rates) >= self._models:
            self._rates.clear()
        rates = self._rates[model] = [*self._fallback, 1.0, 1.0]
        return rates
