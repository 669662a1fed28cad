"""score-heads: the per-step attention rules on constructed attention patterns,
answer checks, trial filtering and normalisation, prompts, the decoding loop on a
tiny random Llama against a cache-free reference, and the resumable CLI."""

import json

import pytest
import torch

from headkv_vllm.tools.scoring.attention_credit import reasoning_credit, retrieval_credit
from headkv_vllm.tools.common.haystack import haystack_text
from headkv_vllm.tools.common.needle import rouge1_recall
from headkv_vllm.tools.scoring.probes import (
    NEEDLES,
    PromptBuilder,
    Trial,
    depths,
    grid,
    is_correct,
    lengths,
    qa_f1,
)
from headkv_vllm.tools.scoring.score_heads import ProbeRunner, mean_of_correct, needle_header
from headkv_vllm.tools.scoring.score_heads import main as score_heads
from headkv_vllm.method.scores import ModelIdentity, ScoreFileError, identity_from_hf_config, load_scores, write_scores

SPAN = (4, 7)  # needle tokens at positions 4, 5, 6


def one_hot_rows(tops, positions=12):
    """attention [layers=1, heads, positions]: head h puts 0.9 on tops[h], the rest spread evenly."""
    attn = torch.full((1, len(tops), positions), 0.1 / (positions - 1))
    for h, p in enumerate(tops):
        attn[0, h, p] = 0.9
    return attn


def test_retrieval_rule_credits_the_head_that_copies_from_the_needle():
    ids = torch.tensor([10, 11, 12, 13, 20, 21, 22, 14, 15, 16, 17, 18])
    attn = one_hot_rows([5, 5, 2, 9])  # heads 0,1 look at the needle; 2,3 elsewhere
    ids[2] = 21  # head 2 looks at the same token, but outside the needle
    credit = retrieval_credit(attn, SPAN, ids, token=21)
    # head 0: in the needle and the token matches -> 1/N; head 1 is the same row (also 1/N)
    assert credit.tolist() == [[pytest.approx(1 / 3), pytest.approx(1 / 3), 0.0, 0.0]]
    # same attention, another generated token: looking at the needle is not enough
    assert retrieval_credit(attn, SPAN, ids, token=22).tolist() == [[0.0, 0.0, 0.0, 0.0]]


def test_reasoning_rule_sums_top_n_weights_inside_the_target():
    attn = torch.zeros(1, 3, 12)
    attn[0, 0, [4, 5, 6]] = torch.tensor([0.5, 0.3, 0.2])  # all of its attention on the target
    attn[0, 1, [5, 9, 10]] = torch.tensor([0.4, 0.35, 0.25])  # top-3: one inside
    attn[0, 2, [0, 1, 2, 3]] = 0.25  # none inside
    credit = reasoning_credit(attn, SPAN)
    assert credit[0].tolist() == pytest.approx([1.0 / 3, 0.4 / 3, 0.0])


def test_answer_checks():
    r, r2 = NEEDLES["R"][0], NEEDLES["R2"][0]
    assert is_correct("R", r, "The secret ingredient in Grandma Rosa's soup is smoked paprika.")
    # restating the question recalls most of the needle's words, but not the answer
    assert rouge1_recall("The secret ingredient in Grandma Rosa's soup is garlic.", r.text) > 0.5
    assert not is_correct("R", r, "The secret ingredient in Grandma Rosa's soup is garlic.")
    assert not is_correct("R", r, "smoked paprika")  # the method's rule: recall of the needle > 0.5
    assert is_correct("R2", r2, " tennis.") and qa_f1("the tennis", "tennis") == 1.0
    assert not is_correct("R2", r2, " rowing.")  # the distractor
    assert not is_correct("R2", r2, " probably the sport of the younger person")


def test_trials_header_names_the_target_and_distractor_sentences():
    assert [(h["target"], h["distractor"]) for h in map(needle_header, NEEDLES["R2"])] == [(2, 3), (3, 2)]
    assert needle_header(NEEDLES["R"][0]) == {
        "sentences": NEEDLES["R"][0].sentences, "question": NEEDLES["R"][0].question, "answer": "smoked paprika",
        "target": None, "distractor": None, "answer_prefix": ""}


def test_mean_over_correct_trials_only():
    records = [
        {"correct": True, "scores": [[1.0, 0.0], [0.0, 3.0]]},
        {"correct": False, "scores": [[50.0, 50.0], [50.0, 50.0]]},
        {"correct": True, "scores": [[0.0, 0.0], [2.0, 1.0]]},
    ]
    scores, kept = mean_of_correct(records)
    assert kept == 2 and scores == [[0.5, 0.0], [1.0, 2.0]]
    with pytest.raises(ScoreFileError, match="none of the 1 trials was answered correctly"):
        mean_of_correct(records[1:2])


def test_scores_are_l1_normalised_over_all_heads(tmp_path):
    model = ModelIdentity("Tiny-LM", 2, 2, 1, 8)
    path = write_scores(tmp_path / "s.json", model, "R", [[0.5, 0.0], [1.0, 2.0]], trials=2, command="test")
    s = load_scores(path)
    assert s.query_head_scores == ((0.5 / 3.5, 0.0), (1.0 / 3.5, 2.0 / 3.5))
    assert s.kv_head_scores == ((0.5 / 3.5,), (3.0 / 3.5,))


def test_grid_is_needles_x_lengths_x_depths():
    assert depths(10)[:3] == [0.0, 11.1, 22.2] and depths(10)[-1] == 100.0
    assert lengths(500, 2500, 5) == [500, 1000, 1500, 2000, 2500]
    plan = grid("R", [500, 1000], depths(3))
    assert len(plan) == len(NEEDLES["R"]) * 2 * 3 and len({t.key for t in plan}) == len(plan)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def builder(tokenizer):
    return PromptBuilder(tokenizer, haystack_text()[:30000])


@pytest.mark.parametrize("depth", [0.0, 33.3, 100.0])
@pytest.mark.parametrize("probe", ["R", "R2"])
def test_prompt_has_the_length_and_an_exact_needle_span(builder, tokenizer, probe, depth):
    needle = NEEDLES[probe][1]
    prompt = builder.build(needle, 600, depth)
    assert len(prompt.ids) == 600
    start, end = prompt.needle_span
    assert tokenizer.decode(prompt.ids[start:end]).strip() == needle.text
    target = needle.text if needle.target is None else needle.sentences[needle.target]
    assert tokenizer.decode(prompt.ids[slice(*prompt.target_span)]).strip() == target
    before, after = tokenizer.decode(prompt.ids[:start]), tokenizer.decode(prompt.ids[end:])
    if depth == 0:
        assert before.endswith("<text>\n")
    elif depth == 100:  # at the very end of the text
        assert after.startswith("\n</text>")
    else:  # at a sentence boundary
        assert before.rstrip().endswith((".", "?", "!"))
    text = tokenizer.decode(prompt.ids)
    assert needle.question in text and text.endswith(needle.answer_prefix or "assistant\n")


def test_prompt_too_short_is_an_error(builder):
    with pytest.raises(ValueError, match="context length 50 is too short"):
        builder.build(NEEDLES["R"][0], 50, 0)


def tiny_llama(tokenizer, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        initializer_range=0.5,  # peaked attention: no near-ties in top-k between the two paths
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def reference_trial(model, tokenizer, runner, probe, trial):
    """Cache-free greedy decoding with eager attention over the whole sequence at every step."""
    needle = NEEDLES[probe][trial.needle]
    prompt = runner.builder.build(needle, trial.length, trial.depth)
    seq = list(prompt.ids)
    ids = torch.tensor(prompt.ids)
    credit = torch.zeros(2, 4)
    model.set_attn_implementation("eager")
    try:
        for _ in range(runner.max_new_tokens(trial.needle)):
            with torch.no_grad():
                out = model(torch.tensor([seq]), output_attentions=True, logits_to_keep=1)
            token = int(out.logits[0, -1].argmax())
            if token in runner.stop_ids or "\n" in tokenizer.decode([token]):
                break
            attn = torch.stack([a[0, :, -1, :] for a in out.attentions])
            if probe == "R":
                credit += retrieval_credit(attn, prompt.target_span, ids, token)
            else:
                credit += reasoning_credit(attn, prompt.target_span)
            seq.append(token)
    finally:
        model.set_attn_implementation("sdpa")
    return tokenizer.decode(seq[len(prompt.ids):], skip_special_tokens=True), credit


@pytest.mark.parametrize("probe", ["R", "R2"])
def test_decoding_loop_matches_a_cache_free_reference(tokenizer, probe):
    model = tiny_llama(tokenizer)
    runner = ProbeRunner(model, tokenizer, probe, haystack_text()[:30000])
    trial = Trial(needle=0, length=300, depth=50.0)
    result = runner.run(trial)
    answer, credit = reference_trial(model, tokenizer, runner, probe, trial)
    assert result.steps > 0 and result.answer == answer
    assert torch.tensor(result.scores) == pytest.approx(credit, abs=1e-5)
    assert model.config._attn_implementation == "sdpa"  # restored after decoding


def test_model_identity_from_a_transformers_config(tokenizer):
    identity = identity_from_hf_config(tiny_llama(tokenizer).config.get_text_config(), "Tiny-LM")
    assert (identity.num_layers, identity.num_query_heads, identity.num_kv_heads, identity.head_dim) == (2, 4, 2, 16)


def test_cli_appends_trials_resumes_and_refuses_without_correct_answers(tmp_path, tokenizer, capsys):
    folder = tmp_path / "Tiny-LM"
    tiny_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    trials = tmp_path / "trials.jsonl"
    args = [str(folder), "--probe", "R2", "--min-length", "250", "--max-length", "250", "--num-lengths", "1",
            "--num-depths", "2", "--output", str(tmp_path / "out.json"), "--trials-file", str(trials)]
    assert score_heads(args + ["--limit", "3"]) == 0
    assert "3 of 4 trials done" in capsys.readouterr().out
    lines = trials.read_text().splitlines()
    assert json.loads(lines[0])["probe"] == "R2" and len(lines) == 4
    first = json.loads(lines[1])
    assert len(first["scores"]) == 2 and len(first["scores"][0]) == 4 and first["key"] == "0/250/0"

    with trials.open("a") as f:
        f.write('{"key": "1/250/0", "needle"')  # a line cut short by an interrupt
    with pytest.raises(SystemExit, match="none of the 4 trials was answered correctly"):
        score_heads(args)  # a random model answers nothing correctly: no score file
    assert "4 trials, 3 done before" in capsys.readouterr().out
    assert len(trials.read_text().splitlines()) == 5 and not (tmp_path / "out.json").exists()

    with pytest.raises(SystemExit, match="trials.jsonl: this trials file was written for 'Tiny-LM' probe 'R2'"):
        score_heads(args[:2] + ["R"] + args[3:])
