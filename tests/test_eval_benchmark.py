"""The shipped benchmark: 100 styles x 4 objects, no duplicates, non-empty strings."""

from stylealigned.eval import load_benchmark
from stylealigned.eval.benchmark import KINDS, PROMPT_TEMPLATE


def test_benchmark_has_100_styles_of_4_distinct_objects():
    styles = load_benchmark()
    assert len(styles) == 100
    assert len({entry.style.casefold() for entry in styles}) == 100
    for entry in styles:
        assert entry.style.strip() == entry.style != ""
        assert len(entry.objects) == 4
        assert len({name.casefold() for name in entry.objects}) == 4
        assert all(isinstance(name, str) and name.strip() == name != "" for name in entry.objects)


def test_prompts_put_the_object_before_the_style():
    entry = load_benchmark()[0]
    prompts = entry.prompts()
    assert prompts == [PROMPT_TEMPLATE.format(object=name, style=entry.style) for name in entry.objects]
    assert prompts[0] == f"{entry.objects[0]}, {entry.style}"


def test_every_style_has_a_kind():
    styles = load_benchmark()
    assert {entry.kind for entry in styles} == set(KINDS)
    abstract = [entry.style for entry in styles if entry.kind == "abstract"]
    assert len(abstract) == 15 and any(style.startswith("dreamy") for style in abstract)
    assert "watercolor" in styles[0].style and styles[0].kind == "concrete"
