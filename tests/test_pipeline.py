"""The data pipeline runner: end to end on a hand-made corpus, crash and resume, Ray, built-in."""

import json
from pathlib import Path

import pytest

from internlm2.data import pipeline
from internlm2.data.pipeline import PipelineConfig, run_pipeline

REPO = Path(__file__).resolve().parents[1]

EN1 = ("The river runs through the old town and past the mill that the family built in the "
       "last century. In the spring the water is high, and the children of the village walk "
       "to the bridge to watch it. The miller keeps a record of the floods in a book that is "
       "older than the house itself.\nHis daughter now reads it to visitors, and she explains "
       "how the town learned to live with the river rather than against it. It is a quiet "
       "place, and most of the people who come here stay longer than they planned.")
EN2 = ("A good loaf of bread needs only flour, water, salt and time. The baker mixes the dough "
       "in the evening and leaves it to rise slowly through the night, because a slow rise "
       "gives the bread more flavour. In the morning she shapes the loaves and bakes them in a "
       "hot oven with steam.\nThe crust should be dark and crisp, and the crumb should be open "
       "and soft. Many people think that baking is difficult, but it is mostly a matter of "
       "patience and of paying attention to the dough.")
# EN2 with three words changed: a near copy (Jaccard of word 5-grams about 0.8)
EN2_NEAR = (EN2.replace("evening", "afternoon").replace("crisp", "firm")
            .replace("patience", "practice"))
EN_LONG = "\n".join([
    "Scientists have studied the migration of birds for centuries, however the question of "
    "how they find their way is still open. Some species follow the coast, because the line "
    "of the shore is easy to see from the air.",
    "Others, although they fly at night, keep a steady course; therefore researchers believe "
    "that they read the stars. Moreover, experiments with magnets suggest that many birds can "
    "sense the field of the earth.",
    "Thus a bird may combine several cues, and if one of them fails it can still rely on the "
    "others. In addition, young birds learn the route from older ones, so the knowledge passes "
    "from one generation to the next.",
    "Weather matters as well. Strong winds push small birds off their course, yet they often "
    "correct the error within a day, which shows that their sense of position is not a simple "
    "habit but an active calculation.",
    "Nevertheless, some questions remain. For example, it is not clear whether a bird that has "
    "been moved far away knows where it is, or only knows the direction it should fly.",
    "In contrast, sea turtles seem to carry a map of the magnetic field that is printed in "
    "their memory when they hatch; as a result they return to the beach where they were born.",
    "Meanwhile, engineers who design robots that navigate without satellites study these "
    "animals closely, since nature solved the problem long before we did.",
])
EN_SAFE_URL = ("The museum opened a new wing this year, and the collection of maps that it holds "
               "is now one of the largest in the country. Visitors can see how the coastline "
               "was drawn by sailors who had only a compass and the sun to guide them. The "
               "guides are friendly and they answer every question with care, so a visit to "
               "the wing takes most of an afternoon for the people who love old maps.")
ZH1 = ("春天来了，河边的柳树都发芽了。我们一家人在周末去公园散步，孩子们在草地上放风筝，"
       "老人们坐在长椅上聊天。公园里的花开得很好看，空气也很清新。我们走了很久，"
       "最后在湖边的小店里喝了一杯热茶，然后才回家。这是一个让人难忘的下午。")
ZH2 = ("学习一门新的语言需要时间和耐心。每天读一点书，听一点广播，和朋友说几句话，"
       "慢慢地就会进步。老师常常说，错误并不可怕，因为我们可以从错误中学到很多东西。"
       "如果你坚持下去，一年以后你会发现自己已经能够用这门语言表达自己的想法了。")
SPAM = "\n".join([
    "BUY NOW at www.cheap-deals.example and get FREE SHIPPING on every order!",
    "Call now 555-123-4567 for the best price, limited time special offer $9.99!",
    "Click here www.cheap-deals.example/promo for a coupon, promo code SAVE50, hot sale!",
    "Order now, money back guarantee, discount for the first 100 buyers, email sales@deals.example",
    "Shop now and add to cart: lowest price $4.99, deal of the day, act now!",
])
LOREM = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 8).strip()


def _docs() -> list[dict]:
    return [
        {"id": "en1", "text": EN1, "url": "https://river.example/mill"},
        {"id": "en2", "text": EN2},
        {"id": "en1-copy", "text": EN1},  # exact duplicate of en1
        {"id": "en2-near", "text": EN2_NEAR},  # near duplicate of en2
        {"id": "en-long", "text": EN_LONG},
        {"id": "bad-domain", "text": EN_SAFE_URL, "url": "https://www.pornhub.com/video/1"},
        {"id": "zh1", "text": ZH1},
        {"id": "zh2", "text": ZH2},
        {"id": "spam", "text": SPAM},
        {"id": "lorem", "text": LOREM},
        {"id": "short", "text": "Too short."},
    ]


MALFORMED = ["{not json", "[1, 2, 3]", json.dumps({"title": "no text field"})]

UTIL_PY = '''"""Small helpers for the demo package."""


def clamp(value, low, high):
    """Return value limited to the closed range [low, high]."""
    # the order of the checks matters when low > high
    if value < low:
        return low
    if value > high:
        return high
    return value


def mean(values):
    """The arithmetic mean of a non-empty list of numbers."""
    return sum(values) / len(values)
'''
MAIN_PY = '''"""Entry point of the demo package: prints a few clamped means."""

from pkg.util import clamp, mean


def main():
    # numbers chosen to exercise both bounds
    data = [3, 9, 14, -2, 7]
    print(clamp(mean(data), 0, 5))
    print(clamp(mean(data[:2]), 0, 5))


if __name__ == "__main__":
    main()
'''
README = "# Demo\n\nA tiny package used by the pipeline tests: helpers and a main module.\n"


def make_corpus(root: Path) -> dict:
    """en.jsonl (with malformed lines), zh.jsonl, web.jsonl and a code repository."""
    root.mkdir(parents=True, exist_ok=True)
    docs = _docs()
    en = [d for d in docs if d["id"].startswith("en")]
    zh = [d for d in docs if d["id"].startswith("zh")]
    web = [d for d in docs if d not in en and d not in zh]
    lines = [json.dumps(d, ensure_ascii=False) for d in en]
    lines[2:2] = MALFORMED[:2]
    lines.append(MALFORMED[2])
    (root / "en.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "zh.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in zh),
                                   encoding="utf-8")
    (root / "web.jsonl").write_text("".join(json.dumps(d) + "\n" for d in web), encoding="utf-8")
    repo = root / "demo_repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "pkg").mkdir()
    (repo / "README.md").write_text(README)
    (repo / "pkg" / "util.py").write_text(UTIL_PY)
    (repo / "pkg" / "main.py").write_text(MAIN_PY)
    (repo / "pkg" / "tiny.py").write_text("x = 1\n")  # too small: low quality, dropped
    return {"inputs": [str(root / "en.jsonl"), str(root / "zh.jsonl"), str(root / "web.jsonl"),
                       str(repo)],
            "records": len(docs) + len(MALFORMED) + 4}


def _config(corpus: dict, out: Path, **kw) -> PipelineConfig:
    cfg = PipelineConfig(inputs=corpus["inputs"], output=str(out), shards=3, progress=False, **kw)
    cfg.stages["longctx"]["min_bytes"] = 1000  # the test documents are small
    return cfg


def _outputs(out: Path) -> dict[str, bytes]:
    """Every output file (clean/, removed/, long/, shards/) by relative path."""
    files = {}
    for sub in ("clean", "removed", "long", "shards", "shards_long"):
        for p in sorted((out / sub).rglob("*")):
            if p.is_file():
                files[str(p.relative_to(out))] = p.read_bytes()
    return files


def _lines(out: Path, sub: str) -> list[dict]:
    return [json.loads(line) for p in sorted((out / sub).rglob("*.jsonl"))
            for line in p.read_text(encoding="utf-8").splitlines()]


def _stats(out: Path) -> dict:
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    stats.pop("timing")
    return stats


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """One uninterrupted run with a process pool of 2 workers."""
    out = tmp_path_factory.mktemp("reference") / "out"
    stats = run_pipeline(_config(corpus, out, workers=2))
    return out, stats


def test_end_to_end_kept_removed_reasons_and_balance(corpus, reference):
    out, stats = reference
    clean = _lines(out, "clean")
    kept_ids = {d["id"] for d in clean}
    repo = [d for d in clean if d.get("repo") == "demo_repo"]
    assert kept_ids - {d["id"] for d in repo} == {"en1", "en2", "en-long", "zh1", "zh2"}
    # the repository became one markdown document, README first, util before main
    assert len(repo) == 1 and repo[0]["lang"] == "code" and len(repo[0]["merged_ids"]) == 3
    text = repo[0]["text"]
    assert text.startswith("# Repository: demo_repo\n\n## File: README.md")
    assert text.index("## File: pkg/util.py") < text.index("## File: pkg/main.py")
    assert "```python" in text and repo[0]["code_quality"]["level"] in ("high", "moderate")
    # every kept line keeps its id and metadata
    en1 = next(d for d in clean if d["id"] == "en1")
    assert en1["url"] == "https://river.example/mill" and en1["lang"] == "en"
    assert {d["id"]: d["lang"] for d in clean if d["id"].startswith("zh")} == {"zh1": "zh",
                                                                               "zh2": "zh"}

    removed = {d.get("id"): d for d in _lines(out, "removed") if d["stage"] != "read"}
    expect = {"lorem": ("rules", "c4_lorem_ipsum"), "short": ("rules", "length"),
              "bad-domain": ("safety", "safety_domain"), "spam": ("quality", "quality_ad"),
              "en1-copy": ("dedup", "exact duplicate of en1"),
              "en2-near": ("dedup", "near-duplicate of en2")}
    for doc_id, (stage, reason) in expect.items():
        assert removed[doc_id]["stage"] == stage and removed[doc_id]["reason"].startswith(reason)
        assert removed[doc_id]["text"]  # removed documents keep their text
    tiny = [d for d in removed.values() if d.get("path") == "pkg/tiny.py"]
    assert len(tiny) == 1 and tiny[0]["stage"] == "code"
    assert tiny[0]["reason"].startswith("code_quality_low: too_small")
    assert len(removed) == len(expect) + 1

    # malformed lines: reported with file and line, written to removed/read/
    bad = [d for d in _lines(out, "removed") if d["stage"] == "read"]
    assert sorted((Path(d["file"]).name, d["line"], d["reason"].split(":")[0]) for d in bad) == [
        ("en.jsonl", 3, "json"), ("en.jsonl", 4, "not_object"), ("en.jsonl", 8, "missing_text")]

    # nothing vanishes: records in = kept (input documents) + removed + malformed
    kept_sources = sum(len(d.get("merged_ids") or [d]) for d in clean)
    assert corpus["records"] == 18
    assert corpus["records"] == kept_sources + len(removed) + len(bad)
    bal = stats["balance"]
    assert bal == {"records_in": 18, "kept": kept_sources, "removed": len(removed),
                   "malformed": 3, "ok": True}

    # long-context subset: a copy, not a removal
    assert [d["id"] for d in _lines(out, "long")] == ["en-long"]
    assert stats["output"]["long"]["docs"] == 1

    # stats.json: per stage in/out, per reason, per language and source
    st = stats["stages"]
    assert list(st) == ["format", "rules", "safety", "quality", "code", "code_repos", "dedup"]
    for name, s in st.items():
        merged = s.get("files_merged", 0) - s.get("repo_docs", 0)
        assert s["docs_in"] == s["docs_out"] + s["docs_removed"] + merged, name
    assert st["format"]["docs_in"] == 15 and st["format"]["bytes_in"] > 0
    assert st["rules"]["removed"] == {"c4_lorem_ipsum": {"docs": 1, "bytes": len(LOREM)},
                                      "length": {"docs": 1, "bytes": 10}}
    assert st["dedup"]["removed"]["exact duplicate"]["docs"] == 1
    assert st["dedup"]["removed"]["near-duplicate"]["docs"] == 1
    assert st["code_repos"]["files_merged"] == 3 and st["code_repos"]["repo_docs"] == 1
    assert stats["output"]["by_lang"]["zh"]["docs_out"] == 2
    assert stats["output"]["by_lang"]["en"]["docs_out"] == 3
    assert st["format"]["by_source"][corpus["inputs"][1]]["docs_in"] == 2
    assert stats["read"]["error_counts"] == {"json": 1, "not_object": 1, "missing_text": 1}

    report = (out / "report.md").read_text(encoding="utf-8")
    for needle in ("## Stages", "| rules | 15 | 13 | 2 |", "c4_lorem_ipsum", "safety_domain",
                   "exact duplicate of en1", "near-duplicate of en2", "en.jsonl:3",
                   "Balance: 18 records in = 8 kept + 7 removed + 3 malformed: ok",
                   "## Examples of removed documents", "## Long-context subset"):
        assert needle in report, needle
    assert not (out / ".work").exists()  # intermediates go when the run completes


def test_deterministic_and_independent_of_workers(corpus, reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "out"
    run_pipeline(_config(corpus, out, workers=1))
    assert _outputs(out) == _outputs(ref_out)
    assert _stats(out) == _stats(ref_out)
    # a rerun of a finished run does no work and changes nothing
    before = _outputs(out)
    run_pipeline(_config(corpus, out, workers=1))
    assert _outputs(out) == before


def test_crash_in_a_stage_then_resume_gives_the_same_output(corpus, reference, tmp_path,
                                                            monkeypatch):
    ref_out, _ = reference
    out = tmp_path / "out"
    real_stage_object = pipeline._stage_object

    class Crashing:
        """The quality filter, crashing on the second document of the second shard."""

        def __init__(self, inner):
            self.inner = inner

        def check(self, doc):
            if doc["id"] == "zh2":
                raise RuntimeError("simulated crash")
            return self.inner.check(doc)

    def crashing(stage, opts):
        obj = real_stage_object(stage, opts)
        return Crashing(obj) if stage == "quality" else obj

    monkeypatch.setattr(pipeline, "_stage_object", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pipeline(_config(corpus, out, workers=1))
    state = out / ".state" / "quality"
    assert (state / "part-00000.json").is_file() and not (state / "part-00001.json").exists()
    # the half-written shard left neither its output nor a temporary file behind
    assert not list((out / ".work" / "quality").glob("part-00001*"))
    done_marker = (state / "part-00000.json").stat().st_mtime_ns

    monkeypatch.setattr(pipeline, "_stage_object", real_stage_object)
    calls = []
    real_process_shard = pipeline.process_shard

    def counting(task):
        calls.append((task.stage, task.shard))
        return real_process_shard(task)

    monkeypatch.setattr(pipeline, "process_shard", counting)
    run_pipeline(_config(corpus, out, workers=1))
    # finished shards were not redone: format, rules, safety and quality shard 0
    assert not [c for c in calls if c[0] in ("format", "rules", "safety")]
    assert [c for c in calls if c[0] == "quality"] == [("quality", 1), ("quality", 2)]
    assert (state / "part-00000.json").stat().st_mtime_ns == done_marker
    assert _outputs(out) == _outputs(ref_out)
    assert _stats(out) == _stats(ref_out)


def test_ray_executor_gives_the_same_output(corpus, reference, tmp_path):
    pytest.importorskip("ray", reason="the Ray executor needs the optional 'ray' package "
                                      "(pip install 'internlm2[ray]')")
    ref_out, _ = reference
    out = tmp_path / "out"
    stats = run_pipeline(_config(corpus, out, workers=2, executor="ray"))
    assert stats["balance"]["ok"]
    assert _outputs(out) == _outputs(ref_out)
    assert _stats(out) == _stats(ref_out)


def test_config_errors_name_the_key_and_the_file(tmp_path):
    cases = {
        "[dedup]\nthreshhold = 0.8\n": "unknown key 'dedup.threshhold'",
        "[input]\npath = ['x']\n": "unknown key 'input.path'",
        "[filters]\nx = 1\n": "unknown table '[filters]'",
        "[run]\nworkers = 'many'\n": "'run.workers' must be an integer",
        "[rules.en]\nmin_wordz = 3\n": "[rules]: unknown rule-filter threshold(s) ['min_wordz']",
        "[quality]\nthreshold = 0.5\nbogus = 1\n": "[quality]: unknown quality-filter config",
        "[safety]\nblocklist = []\n": "unknown key 'safety.blocklist'",
        "[code]\nquality = {high_cutof = 0.9}\n": "[code]:",
        "[run]\nexecutor = 'spark'\n": "run.executor must be 'local' or 'ray'",
    }
    for text, message in cases.items():
        path = tmp_path / "bad.toml"
        path.write_text(text)
        with pytest.raises(ValueError) as e:
            PipelineConfig.from_toml(path)
        assert str(path) in str(e.value) and message in str(e.value), (text, str(e.value))
    path.write_text("[tokenize]\ntokenizer = 'no/such/tokenizer'\n")
    with pytest.raises(FileNotFoundError, match="tokenize.tokenizer"):
        PipelineConfig.from_toml(path)  # before any work is done
    # the shipped config loads
    cfg = PipelineConfig.from_toml(REPO / "configs" / "pipeline-builtin.toml")
    assert cfg.stages["rules"]["skip_sources"] == ["synthetic_en", "synthetic_zh"]
    assert cfg.stage("tokenize") is None and cfg.stage("dedup")["threshold"] == 0.7


def test_other_settings_in_the_same_folder_need_overwrite(corpus, tmp_path):
    out = tmp_path / "out"
    run_pipeline(_config(corpus, out, workers=1))
    cfg = _config(corpus, out, workers=1)
    cfg.stages["dedup"]["threshold"] = 0.9
    with pytest.raises(ValueError, match="stages.dedup"):
        run_pipeline(cfg)
    run_pipeline(cfg, overwrite=True)
    assert json.loads((out / "stats.json").read_text())["config"]["stages"]["dedup"][
        "threshold"] == 0.9


def _cli(*argv) -> int:
    import argparse

    from internlm2.data.cli import add_cli
    parser = argparse.ArgumentParser(prog="internlm2")
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_builtin_corpus_through_the_shipped_config(tmp_path, capsys):
    """`internlm2 data builtin --quick`, then `data run --config configs/pipeline-builtin.toml`
    with a tokenizer: most synthetic and code documents are kept, shards are written."""
    from internlm2.tokenizer import train_tokenizer

    corpus, out = tmp_path / "corpus", tmp_path / "data"
    assert _cli("data", "builtin", "--output", str(corpus), "--quick", "--synthetic", "600",
                "--code-files", "40") == 0
    tok_dir = tmp_path / "tok"
    train_tokenizer([str(corpus / "prose_en.jsonl"), str(corpus / "synthetic.jsonl")],
                    vocab_size=512, output_dir=tok_dir)
    assert _cli("data", "run", "--config", str(REPO / "configs" / "pipeline-builtin.toml"),
                "--input", str(corpus), "--output", str(out), "--tokenizer", str(tok_dir),
                "--seq-len", "256", "--workers", "2", "--no-progress") == 0
    assert "see " + str(out) + "/report.md" in capsys.readouterr().out
    stats = json.loads((out / "stats.json").read_text())
    assert stats["balance"]["ok"]
    src_in = stats["stages"]["format"]["by_source"]
    # synthetic text skips the prose rules: none of it is removed by rules or quality
    for stage in ("rules", "quality"):
        assert not {"synthetic_en", "synthetic_zh"} & {
            s for s, e in stats["stages"][stage]["by_source"].items() if e.get("docs_removed")}
    clean = _lines(out, "clean")
    synthetic = sum(1 for d in clean if d["source"].startswith("synthetic"))
    code_files = sum(len(d["merged_ids"]) for d in clean if d.get("repo"))
    # prose that carries its module's path (docstrings) is not treated as code
    prose = [d for d in clean if d["source"] == "prose_en"]
    assert prose and not [d for d in prose if "code_quality" in d or d["text"].startswith("## ")]
    n_syn = src_in["synthetic_en"]["docs_in"] + src_in["synthetic_zh"]["docs_in"]
    assert synthetic >= 0.6 * n_syn, (synthetic, n_syn)
    assert code_files >= 0.75 * src_in["code"]["docs_in"], code_files
    tk = stats["tokenize"]
    assert tk["main"]["train"]["tokens"] > 0 and tk["packing"]["seq_len"] == 256
    from internlm2.data.shards import TokenShards
    assert TokenShards(out / "shards").num_tokens == tk["main"]["train"]["tokens"]
    assert "## Token shards" in (out / "report.md").read_text(encoding="utf-8")
