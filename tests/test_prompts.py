"""Tagged prompts: a set's pipeline calls keep each distinct embedding row once and the models see the same numbers."""

import contextlib

import pytest
import torch

import stylealigned as sa
from stylealigned import prompts, sets
from stylealigned.prompts import BASE, PromptRows, is_tags, tagged_prompts
from tests.test_control import control_pipe, controlnet_path, controls  # noqa: F401 (a fixture)
from tests.dit_pipelines import PROMPT_KWARGS
from tests.test_transformer_sets import settings as dit_settings

PROMPTS = ["a cat in watercolor style", "a dog", "a house", "a tree", "a dog"]  # "a dog" twice
UNET = dict(num_inference_steps=2, guidance_scale=5.0, height=32, width=32)


def test_tags_stand_for_each_distinct_row_once_in_any_dtype():
    rows = PromptRows()
    embeds = torch.randn(3, 7, 16)
    first = rows.tag(torch.cat([embeds, embeds[:1]]))  # row 3 repeats row 0
    assert is_tags(first) and first.shape == (4, 1, 2) and not is_tags(embeds)
    second = rows.tag(embeds[1:].clone())  # rows already kept, in a tensor of their own
    assert len(rows.table) == 3
    assert torch.equal(rows.lookup(first), torch.cat([embeds, embeds[:1]]))
    assert torch.equal(rows.lookup(second), embeds[1:])
    assert torch.equal(rows.lookup(torch.cat([second, first])[[4, 0]]), embeds[[2, 1]])  # tags move like rows

    many = PromptRows()  # more rows than one tag channel counts: two base-256 digits survive bf16
    distinct = torch.randn(3 * BASE, 2, 3, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    tags = many.tag(distinct)
    assert len(many.table) == 3 * BASE and tags.dtype == torch.bfloat16 and tags.max() == BASE - 1
    assert torch.equal(many.lookup(tags), distinct)
    other = torch.randn(2, 5, 16)  # a sequence of another length than the table's passes through untagged
    assert rows.tag(other) is other


@pytest.mark.parametrize("pipe_name", ["sd_pipe", "sdxl_pipe", "flux_pipe", "sd3_pipe", "chroma_pipe", "controlnet"])
def test_tagged_sets_are_bit_identical_and_the_call_keeps_distinct_rows(request, monkeypatch, pipe_name, decoded):
    """Chunked and whole, with and without tags: the same latents bit for bit (the denoiser and the ControlNet look
    the tags up); the table holds each distinct row once (one negative row); `encode_prompt` is put back."""
    if pipe_name == "controlnet":
        pipe = control_pipe(request, "sd")
        kwargs = UNET | {"control_images": controls(1)[0]}
    else:
        pipe = request.getfixturevalue(pipe_name)
        kwargs = (dit_settings(pipe) if pipe_name in ("flux_pipe", "sd3_pipe") else
                  dict(UNET, guidance_scale=4.0, **PROMPT_KWARGS) if pipe_name == "chroma_pipe" else UNET)
    guided = pipe_name != "flux_pipe"  # FLUX.1-dev embeds its guidance: no negative prompt
    tables, encoded = [], []
    original = prompts.tagged_prompts

    def keeping(handle):
        with original(handle) as rows:
            tables.append(rows)
            tag = rows.tag
            rows.tag = lambda embeds: encoded.append(embeds) or tag(embeds)
            yield rows

    def latents(tagging, **more):
        monkeypatch.setattr(sets, "tagged_prompts", tagging)
        found = {}
        sets.generate_set(pipe, PROMPTS, seed=3, on_image=lambda i, image: found.setdefault(i, image.info["latent"]),
                          **kwargs | more)
        assert "encode_prompt" not in vars(pipe)
        return torch.stack([found[i] for i in range(len(PROMPTS))])

    for more in ({}, {"batch_size": 2}):
        plain = latents(lambda handle: contextlib.nullcontext(), **more)
        assert torch.equal(latents(contextlib.contextmanager(keeping), **more), plain)
    rows = [row for embeds in encoded for row in embeds]
    assert len(rows) == 2 * len(PROMPTS) * (1 + guided)  # two calls, each encoding every prompt (and negative)
    distinct = [row for i, row in enumerate(rows) if not any(torch.equal(row, seen) for seen in rows[:i])]
    assert len(tables[0].table) == len(tables[1].table) == len(distinct)  # both calls encode the same bits
    assert len(distinct) <= len(PROMPTS) + (2 if guided else 0)  # negatives: equal up to position rounding


def test_encode_prompt_is_put_back_after_an_error(sd_pipe):
    own = sd_pipe.encode_prompt
    sd_pipe.encode_prompt = own  # an instance attribute of the user's own stays theirs
    with sa.apply(sd_pipe) as handle:
        with pytest.raises(RuntimeError, match="stopped"), tagged_prompts(handle):
            raise RuntimeError("stopped")
        assert vars(sd_pipe)["encode_prompt"] is own and handle.run.prompt_rows is None
    del sd_pipe.encode_prompt
    with sa.apply(sd_pipe) as handle, pytest.raises(RuntimeError, match="stopped"), tagged_prompts(handle):
        raise RuntimeError("stopped")
    assert "encode_prompt" not in vars(sd_pipe)
