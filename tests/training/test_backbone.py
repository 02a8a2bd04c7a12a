"""The shipped backbone: its corpus never holds a suite task, the artefact matches its recipe, it loads."""

from __future__ import annotations

import random
from dataclasses import asdict

from training import backbone, suite


def test_no_backbone_skill_is_a_suite_task():
    rng = random.Random(7)
    words = [suite.random_word(rng) for _ in range(64)]
    for name, skill in backbone.BACKBONE_SKILLS.items():
        for task in suite.ALL_TASKS:
            assert any(skill(w) != suite.apply(task, w) for w in words), (name, task)


def test_corpus_is_seeded_and_names_no_suite_task():
    recipe = backbone.BackboneRecipe(lm_lines=50, skill_lines=20)
    lines = backbone.corpus(recipe)
    assert lines == backbone.corpus(recipe) != backbone.corpus(backbone.BackboneRecipe(seed=1, lm_lines=50,
                                                                                    skill_lines=20))
    prompts = {line.split(":")[0] for line in lines if " -> " in line}
    assert prompts == set(backbone.BACKBONE_SKILLS)
    tokenizer = backbone.train_tokenizer(lines)
    for task in suite.ALL_TASKS[:20]:  # every character of the suite's prompts and answers is a token
        ex = suite.generate(task, 1, 0)[0]
        assert tokenizer.unk_token_id not in tokenizer(f"{ex.input} {ex.target}")["input_ids"]


def test_the_shipped_artefact_is_its_recipe_and_loads():
    from training.model import load_backbone

    built = backbone.shipped_recipe()
    assert built["backbone_version"] == backbone.BACKBONE_VERSION
    assert built["recipe"] == asdict(backbone.BackboneRecipe())  # a changed recipe needs `make backbone`
    model, tokenizer = load_backbone(str(backbone.SHIPPED))
    assert model.config.head_dim >= 32 and tokenizer.chat_template == backbone.CHAT_TEMPLATE
    ex = suite.generate(suite.HELD_OUT_TASKS[0], 1, 0)[0]
    assert tokenizer.unk_token_id not in tokenizer(f"{ex.input} {ex.target}")["input_ids"]
