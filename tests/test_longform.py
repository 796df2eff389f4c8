"""Long texts (longform.py): the chunker on English, Chinese and Arabic paragraphs, chunk prompts made by the one
builder and bounded in context, many texts at once as each alone, a clip with its chunks' JSON and a failed chunk
named, drift measured on real speech, and a second --eval that encodes no reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

import data
import eval_dir
import generation
import infer
import longform
import metrics
import parity
from conftest import DEMO_DIR, VOICE_PROMPTS, write_jsonl

RATE = 24000
ENGLISH = ("Mr. Smith read the letter twice. It said that the price was 3.14 dollars, e.g. nothing at all! "
           "Was he pleased? He was, and he said so to everyone he met on the long road home that evening.\n\n"
           "The next day began with rain.")
CHINESE = "今天天气很好。我们去公园散步吧！你觉得怎么样？“好的。”他说。这是一个很长的句子，里面有逗号，还有更多的内容需要说出来，直到超过限制为止。"
ARABIC = "ذهبت إلى السوق في الصباح. هل اشتريت الخبز؟ نعم، اشتريت الخبز والحليب والجبن من المتجر الكبير. كيف حالك اليوم؟"


def _words(text: str) -> str:
    return "".join(text.split())


@pytest.mark.parametrize("text, bound, expected", [
    (ENGLISH, 60, ["Mr. Smith read the letter twice.",
                   "It said that the price was 3.14 dollars,",  # 61 characters: cut at its comma
                   "e.g. nothing at all! Was he pleased? He was,",
                   "and he said so to everyone he met on the long road home that",  # no clause fits: cut between words
                   "evening.",
                   "The next day began with rain."]),  # a new paragraph starts a chunk
    (CHINESE, 40, ["今天天气很好。", "我们去公园散步吧！", "你觉得怎么样？“好的。”他说。", "这是一个很长的句子，", "里面有逗号，",
                   "还有更多的内容需要说出来，", "直到超过限制为止。"]),
    (ARABIC, 60, ["ذهبت إلى السوق في الصباح. هل اشتريت الخبز؟", "نعم، اشتريت الخبز والحليب والجبن من المتجر الكبير.",
                  "كيف حالك اليوم؟"]),
], ids=["english", "chinese", "arabic"])
def test_the_chunker_cuts_at_sentence_ends_within_the_bound(text, bound, expected):
    chunks = longform.chunk_text(text, bound)
    assert chunks == expected
    assert all(longform.spoken_length(chunk) <= bound for chunk in chunks)
    assert _words("".join(chunks)) == _words(text), "nothing is lost or repeated"


def test_a_cjk_character_counts_three_and_a_word_over_the_bound_is_cut():
    assert longform.spoken_length("你好ab") == 8
    assert longform.chunk_text("a" * 130, 50) == ["a" * 50, "a" * 50, "a" * 30]
    with pytest.raises(ValueError, match="--chunk-chars must be at least 20"):
        longform.chunk_text("Hello.", 5)


def test_a_chunk_prompt_is_the_builders_with_context_turns_and_only_the_last_turn_is_trained(tiny, parity_case):
    context = (data.ContextTurn("Said first.", parity_case.target_codes[:, :10]),
               data.ContextTurn("Said second.", parity_case.target_codes[:, 10:30]))
    prompt = data.build_sample(tiny.tokenizer, parity_case.ref_text, parity_case.ref_codes, parity_case.text, context=context)
    sample = data.build_sample(tiny.tokenizer, parity_case.ref_text, parity_case.ref_codes, parity_case.text,
                               target_codes=parity_case.target_codes[:, :20], context=context)
    frames = parity_case.ref_codes.shape[1]
    assert prompt.audio_ids_start.tolist() == [0, frames, frames + 10]
    assert torch.equal(sample.input_ids[: len(prompt.input_ids)], prompt.input_ids)
    labelled = (sample.label_ids != -100).nonzero().flatten()
    assert labelled.min() >= len(prompt.input_ids) - 4, "no context turn carries loss"  # the assistant header's 4 ids
    assert "Said first." in tiny.tokenizer.decode(prompt.input_ids)


def _spoken(index: int, failure: str | None = None) -> longform.SpokenChunk:
    codes = torch.full((8, 3), index)
    return longform.SpokenChunk(index, f"chunk {index}.", generation.Clone(np.zeros(10, np.float32), True, codes=codes), failure)


def test_the_context_is_the_last_good_chunks_within_the_bound():
    reference = generation.Reference("ref", torch.zeros((8, 4), dtype=torch.long), None, RATE)
    document = longform.Document(reference, [f"chunk {index}." for index in range(5)])
    spoken = [_spoken(0), _spoken(1), _spoken(2), _spoken(3, "silent")]
    job = longform.next_job(document, spoken, context_chunks=2)
    assert job.text == "chunk 4." and [turn.text for turn in job.context] == ["chunk 1.", "chunk 2."]
    assert [int(turn.codes[0, 0]) for turn in job.context] == [1, 2]
    assert longform.next_job(document, spoken, context_chunks=0).context == ()
    assert [turn.text for turn in longform.next_job(document, spoken[:1], context_chunks=5).context] == ["chunk 0."]


def test_the_chunked_parity_check_passes_and_fails_when_the_context_text_is_dropped(tiny, parity_case, monkeypatch):
    result = parity.check_chunked_prompt(tiny, parity_case)
    assert result.passed, result.detail
    assert "3 clips" in result.detail and "f04f5df" in result.detail
    build = data.build_messages
    monkeypatch.setattr(data, "build_messages", lambda ref_text, text, layout, context_texts=(): build(ref_text, text, layout))
    assert not parity.check_chunked_prompt(tiny, parity_case).passed


def test_many_texts_at_once_give_each_texts_chunks_alone_and_a_failed_chunk_is_named_and_left_out(tiny, tmp_path, capsys):
    """Batch 2 over a text of three chunks and one of one, each row at its own chunk, gives the codes batch 1 does;
    a chunk that ran to the limit is named, and left out of the clip and of the next chunks' context."""
    reference = generation.encode_reference(tiny, str(DEMO_DIR / "en_male_0.flac"), "ref text", False)
    texts = ["First sentence here.", "A second one, somewhat longer than the first.", "Third."]
    documents = [longform.Document(reference, texts), longform.Document(reference, ["Four."])]
    sampling = generation.Sampling(seed=2, max_seconds=1.0)  # seed 2: the tiny model runs the first chunk to the limit
    alone = dict(longform.speak_documents(tiny, documents, sampling, data.PromptLayout(), 2, batch_size=1))
    together = dict(longform.speak_documents(tiny, documents, sampling, data.PromptLayout(), 2, batch_size=2))
    for index in (0, 1):
        assert [chunk.failure for chunk in alone[index].chunks] == [chunk.failure for chunk in together[index].chunks]
        for a, b in zip(alone[index].chunks, together[index].chunks):
            assert torch.equal(a.clone.codes, b.clone.codes), (index, a.index)
    clip = alone[0]
    assert [chunk.failure for chunk in clip.chunks] == ["ran to --max-seconds before the model ended it", None, None]
    assert len(clip.waveform) == sum(len(chunk.clone.waveform) for chunk in clip.chunks[1:])
    assert [turn.text for turn in longform.next_job(documents[0], clip.chunks[:2], 2).context] == [texts[1]]

    out = tmp_path / "one.wav"
    args = infer.parse_args(["--out", str(out)])
    assert infer._write_clip(args, " ".join(texts), out, clip, RATE) == 1
    assert f"chunk 0 left out (ran to --max-seconds before the model ended it): {texts[0]}" in capsys.readouterr().err
    chunks = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))["chunks"]
    assert [(chunk["start"], chunk["ended_by_model"]) for chunk in chunks] == [
        (None, False), (0.0, True), (pytest.approx(chunks[1]["seconds"]), True)]
    assert sf.info(out).frames == len(clip.waveform)


def test_a_long_text_file_is_one_clip_with_its_chunks_json(tmp_path, capsys):
    text = tmp_path / "chapter.txt"
    text.write_text("First sentence here. A second one, somewhat longer than the first.\n\nThird. And a fourth to end.",
                    encoding="utf-8")
    out = tmp_path / "chapter.wav"
    assert infer.main(["--model", "tiny", "--text-file", str(text), "--out", str(out), "--chunk-chars", "50",
                       "--max-seconds", "1", "--seed", "3"]) == 0  # seed 3: the tiny model ends every chunk
    record = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    chunks = record["chunks"]
    assert [chunk["text"] for chunk in chunks] == ["First sentence here.", "A second one, somewhat longer than the first.",
                                                  "Third. And a fourth to end."]
    assert (record["chunk_chars"], record["context_chunks"]) == (50, 2)
    waveform, rate = sf.read(out)
    assert rate == RATE and len(waveform) / rate == pytest.approx(sum(chunk["seconds"] for chunk in chunks), abs=1e-3)
    assert [chunk["start"] for chunk in chunks] == pytest.approx(np.cumsum([0] + [c["seconds"] for c in chunks])[:-1].tolist())
    assert all(chunk["ended_by_model"] and chunk["failure"] is None for chunk in chunks)
    printed = capsys.readouterr().out
    assert "from 3 of 3 chunks" in printed
    assert "1 text(s) spoken in 3 chunks (at paragraphs, and at sentence ends within --chunk-chars 50)" in printed


@pytest.fixture(scope="module")
def judge() -> metrics.Judge:
    return metrics.build_judge()


def test_drift_is_measured_per_chunk_on_real_speech(judge):
    """A 'long clip' whose chunks are real recordings: two of the reference's speaker, then another speaker."""
    woman = data.load_audio(VOICE_PROMPTS / "en_woman.wav", RATE)
    man = data.load_audio(VOICE_PROMPTS / "en_man.wav", RATE)
    reference = judge.reference_embedding("en_woman", lambda: woman[2 * RATE : 4 * RATE], RATE)  # apart from the chunks
    words = (VOICE_PROMPTS / "en_woman.txt").read_text(encoding="utf-8").split()
    pieces = [(woman[: 2 * RATE], " ".join(words[:6])), (woman[-2 * RATE :], " ".join(words[-6:])),
              (np.zeros(RATE, np.float32), "Nothing."), (man[: 2 * RATE], "Maintaining your ability")]
    chunks = [longform.SpokenChunk(index, text, generation.Clone(waveform, True), "silent" if index == 2 else None)
              for index, (waveform, text) in enumerate(pieces)]
    drift = longform.measure_drift(judge, longform.join_chunks(chunks), reference, "en", RATE)
    per_chunk, summary = drift["chunks"], drift["summary"]
    assert per_chunk[2] == {"index": 2, "text": "Nothing.", "failure": "silent"}
    sims = [per_chunk[index]["sim"] for index in (0, 1, 3)]
    assert min(sims[:2]) > sims[2] + 0.1, sims  # the other speaker is further from the reference
    assert per_chunk[0]["sim_to_first"] == pytest.approx(1.0) and per_chunk[3]["sim_to_first"] < per_chunk[1]["sim_to_first"]
    assert all(per_chunk[index]["error_rate"] is not None for index in (0, 1, 3))
    assert summary["chunks"] == 4 and summary["drift_sim_first"] == sims[0] and summary["drift_sim_last"] == sims[2]
    assert summary["drift_sim_last_to_first"] == per_chunk[3]["sim_to_first"]
    assert summary["drift_sim_slope"] < 0 and summary["drift_wer_slope"] is not None
    assert set(summary) == set(metrics.DRIFT_COLUMNS)


def test_a_second_eval_encodes_no_reference_and_a_long_row_gets_its_drift(demo_clips, tmp_path, monkeypatch, capsys):
    long_text = "First sentence here. A second one, somewhat longer than the first."
    rows = [demo_clips["en_female_0"], {**demo_clips["en_female_1"], "text": long_text}]
    listed = write_jsonl(tmp_path / "eval.jsonl", rows)
    encoded = []
    encode = data.encode_clip
    monkeypatch.setattr(data, "encode_clip", lambda tokenizer, waveform: encoded.append(1) or encode(tokenizer, waveform))
    flags = ["--model", "tiny", "--max-seconds", "1", "--seed", "3", "--language", "en", "--chunk-chars", "50",
             "--score-cache", str(tmp_path / "scores"), "--ref-codes-cache", str(tmp_path / "codes")]
    summaries = []
    for run in ("first", "second"):
        assert infer.main(["--eval", str(listed), "--out", str(tmp_path / run)] + flags) == 0
        summaries.append(json.loads((tmp_path / run / "summary.json").read_text(encoding="utf-8")))
    assert [summary["reference_code_cache"]["encoded"] for summary in summaries] == [2, 0]
    assert summaries[1]["reference_code_cache"]["hits"] == 2 and len(encoded) == 2, "the second run encodes nothing"
    assert "reference codes: 2 read from" in capsys.readouterr().out
    records = {record["id"]: record for record in eval_dir.read_rows(tmp_path / "first" / "rows.csv")}
    long_id = rows[1]["id"]
    assert records[long_id]["chunks"] == 2 and records[rows[0]["id"]]["chunks"] is None
    [line] = (tmp_path / "first" / "drift.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(line)["id"] == long_id and len(json.loads(line)["chunks"]) == 2
    assert summaries[0]["drift"]["chunks"]["n"] == 1


def test_a_chunk_with_nothing_to_say_joins_its_neighbour():
    # A section break ("* * *") is a paragraph of its own; as a chunk the builder refused it mid-text.
    chunks = longform.chunk_text("* * *\n\nChapter one begins.\n\n* * *\n\nChapter two begins.", 300)
    assert chunks == ["* * * Chapter one begins. * * *", "Chapter two begins."]
    assert all(data.is_speakable(data.normalize_text(chunk)) for chunk in chunks)


def test_a_long_text_with_a_chunk_that_ran_to_the_limit_is_not_stopped():
    # The good chunks all ended by definition; the joined clip's stop flag (fail_runaway) must see the failed one.
    runaway = longform.SpokenChunk(1, "chunk 1.", generation.Clone(np.zeros(10, np.float32), False),
                                   "ran to --max-seconds before the model ended it")
    assert longform.join_chunks([_spoken(0), _spoken(2)]).stopped
    assert not longform.join_chunks([_spoken(0), runaway, _spoken(2)]).stopped


def test_a_long_row_with_a_silent_chunk_is_counted_silent():
    import evaluate
    from conftest import scored_records

    silent = longform.SpokenChunk(1, "chunk 1.", generation.Clone(np.zeros(10, np.float32), True), "silent")
    record = {**scored_records(1)[0], "fail_silent": False, "fail_any": False}
    flagged = evaluate.with_chunk_failures(dict(record), longform.join_chunks([_spoken(0), silent, _spoken(2)]))
    assert flagged["fail_silent"] and flagged["fail_any"]
    assert not evaluate.with_chunk_failures(dict(record), longform.join_chunks([_spoken(0), _spoken(2)]))["fail_silent"]
