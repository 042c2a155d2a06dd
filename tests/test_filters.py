"""Formatting, rule filters, safety and quality on hand-made English and Chinese documents."""

from __future__ import annotations

import argparse
import json
import random
import re

import numpy as np
import pytest

from internlm2.data.filters import (
    DEFAULT_THRESHOLDS,
    RULES,
    RuleFilter,
    SafetyFilter,
    TextStats,
    gopher_dup_ngram,
    strip_boilerplate_lines,
)
from internlm2.data.format import detect_language, doc_id, format_document, normalize_text
from internlm2.data.quality import (
    QualityClassifier,
    QualityFilter,
    add_cli,
    parse_label,
    rule_quality,
    QualityRules,
)

EN_PROSE = """The river town grew slowly over the nineteenth century. Farmers brought their grain to the mill by the water, and the miller kept careful records of every sack that passed through his doors. Those records, which survive in the county archive, show how the harvest changed from year to year and how families moved in and out of the valley.

Historians have used the ledgers to study the effect of the railway, which reached the town in 1871. Before the line was built, most of the grain was sold within a day's walk of the mill. Afterwards, merchants from the city bought a large share of it, and prices began to follow the markets of distant ports rather than the local weather.

The change was not welcomed by everyone. Some of the older farmers complained that they had lost control of their trade, while younger ones saw an opportunity to grow new crops and to send their children to school in the city. The story of the mill is therefore also a story about how a small community learned to live with a wider world."""

ZH_NEWS = """新华社北京3月5日电 记者从国家统计局了解到，今年前两个月，全国规模以上工业增加值同比增长百分之七，比去年同期加快了一点二个百分点。其中，制造业的增长较为明显，高技术制造业增加值增长更快，对整体工业增长的贡献有所提高。
统计局有关负责人表示，随着各项政策措施逐步落地，市场需求正在恢复，企业的生产经营总体保持稳定。不过，外部环境仍然复杂，部分行业的订单还不够充足，下一阶段需要继续巩固经济回升向好的基础。
专家认为，消费和投资的恢复是推动经济增长的主要力量。地方政府也在加快重大项目的建设进度，并为中小企业提供更多的融资支持，这些都有利于稳定就业和提高居民收入。"""

ZH_AD = """限时抢购！全场商品五折优惠，包邮到家！
点击链接立即购买：www.example-shop.cn
咨询热线：400-123-4567
加微信领取优惠券，扫码关注有惊喜！
特价秒杀，每天10点准时开抢！
低价好货，错过再等一年！"""

PY_CODE = '''import os


def walk(root):
    """Yield every file under root."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)


class Counter:
    def __init__(self):
        self.n = 0

    def add(self, k=1):
        self.n += k
        return self.n
'''

LOREM = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
         "incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud "
         "exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat. Duis aute irure "
         "dolor in reprehenderit in voluptate velit esse cillum dolore eu fugiat nulla pariatur.")

_ADJ = ("quiet bright narrow ancient gentle heavy distant silver hollow curious sudden patient "
        "golden humble rapid tender wooden crooked frozen modest eager vivid").split()
_NOUN = ("harbor lantern meadow orchard pilgrim river scholar tailor valley village window "
         "garden bridge market engine candle forest kettle ladder mirror painter sailor").split()
_VERB = ("watched carried followed painted repaired described visited measured guarded "
         "admired crossed borrowed").split()


def _sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"The {rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_VERB)} the "
            f"{rng.choice(_ADJ)} {rng.choice(_NOUN)} with a {rng.choice(_NOUN)} {i}." for i in range(n)]


_SYLLABLES = "ka lo mi ne ru ta sen vor lin dar mes pol tri gan hel bru fen sto wir cam".split()
_STOP = ["the", "of", "and", "to", "with", "that", "in", "is", "a", "was"]


def _prose(n_sentences: int, seed: int = 0) -> list[str]:
    """Sentences of made-up words and English stop words: no repeated n-grams to speak of."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_sentences):
        words = [rng.choice(_STOP) if rng.random() < 0.3 else
                 "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))
                 for _ in range(rng.randint(8, 14))]
        out.append(" ".join(words).capitalize() + ".")
    return out


_ZH_POOL = ("天地人山水风云日月星花草树木鸟鱼虫春夏秋冬东西南北上下左右大小多少高低长短新旧来去出入"
            "开关看听说读写走跑飞游学问教工农商医兵车船路桥城村家国年时分秒早晚红黄蓝绿白黑")
_ZH_FUNC = "的了是在和也就不这我他们与为对都而被把从但"


def _zh_prose(n_sentences: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(_ZH_FUNC) if rng.random() < 0.15 else rng.choice(_ZH_POOL)
                    for _ in range(rng.randint(12, 24))) + "。" for _ in range(n_sentences)]


def _rule(reason: str | None) -> str | None:
    return reason.split(":")[0] if reason else None


def _en(text: str) -> dict:
    return {"id": "t", "text": text, "lang": "en"}


def _zh(text: str) -> dict:
    return {"id": "t", "text": text, "lang": "zh"}


# -- normalisation, language id, ids ----------------------------------------------------------

@pytest.mark.parametrize("raw, want", [
    ("\ufeffHello\u200b world\r\nline two\rline three", "Hello world\nline two\nline three"),
    ("a\x00b\x07c\td\x1b", "abc\td"),
    ("tail   \t\nnext\u3000\n", "tail\nnext"),
    ("a\n\n\n\n\n\nb", "a\n\n\nb"),
    ("\n\n  indented first line", "  indented first line"),
    ("e\u0301t\u00e9", "\u00e9t\u00e9"),                       # NFC composes
    ("price\u00a0100\u2009kg", "price 100 kg"),                # exotic spaces
    ("你好，世界！（测试）：是的；", "你好，世界！（测试）：是的；"),  # full-width punctuation kept
    ("ＡＢＣ１２３ｘｙｚ", "ABC123xyz"),                          # full-width alnum folded
    ("x\u00b2 \ufb01ne", "x\u00b2 \ufb01ne"),                  # not NFKC: ² and ﬁ stay
    ("soft\u00adhyphen word\u2028joiner", "softhyphen word\njoiner"),
])
def test_normalize_text(raw, want):
    assert normalize_text(raw) == want
    assert normalize_text(want) == want  # idempotent


def test_normalize_options():
    assert normalize_text("ＡＢ", fold_width=False) == "ＡＢ"
    assert normalize_text("x\u00b2", form="NFKC") == "x2"
    assert normalize_text("a\n\n\n\nb", max_blank_lines=0) == "a\nb"


@pytest.mark.parametrize("text, lang", [
    (EN_PROSE, "en"),
    ("This is a short test of the detector, and it is written in English.", "en"),
    (ZH_NEWS, "zh"),
    ("今天天气很好，我们去公园散步。Python 是一种编程语言。", "zh"),
    (PY_CODE, "code"),
    ("#include <stdio.h>\nint main(void) {\n    printf(\"hi\\n\");\n    return 0;\n}\n", "code"),
    ("function add(a, b) {\n  const s = a + b;\n  return s;\n}\n", "code"),
    ("Le chat dort sur la table depuis le matin, car il fait beau et chaud dans la maison.", "other"),
    ("今日は天気がいいので、公園に散歩に行きました。とても楽しかったです。", "other"),
    ("Сегодня хорошая погода, и мы пошли гулять в парк.", "other"),
    ("", "other"),
])
def test_detect_language(text, lang):
    got, conf = detect_language(text)
    assert got == lang, (text[:40], got, conf)
    assert 0.0 <= conf <= 1.0


def test_detect_language_lid_hook():
    calls = []

    def lid(text):
        calls.append(text)
        return "zh", 0.99

    assert detect_language(EN_PROSE, lid=lid) == ("zh", 0.99)
    assert detect_language(PY_CODE, lid=lid)[0] == "code"  # code stays built in
    assert len(calls) == 1


def test_doc_id_and_format_document():
    a = doc_id("hello")
    assert re.fullmatch(r"[0-9a-f]{24}", a) and a == doc_id("hello")
    assert a != doc_id("hello", source="web") and a != doc_id("hello!")
    raw = {"text": "Ｈｉ there\r\n\r\n\r\n\r\nbye  ", "url": "http://x.org", "dump": "CC-2023", "source": "web"}
    d = format_document(raw)
    assert d["text"] == "Hi there\n\n\nbye"
    assert d["url"] == "http://x.org" and d["dump"] == "CC-2023" and d["source"] == "web"
    assert d["lang"] in ("en", "other") and "lang_score" in d
    assert d["id"] == doc_id(d["text"], "web")
    assert raw["text"].startswith("Ｈｉ")  # input not modified
    zh = format_document({"text": ZH_NEWS, "id": 7})
    assert zh["lang"] == "zh" and zh["id"] == "7"
    kept = format_document({"text": "hello", "lang": "English"})
    assert kept["lang"] == "en" and "lang_score" not in kept
    code = format_document({"text": 's = "ＡＢ"\nx = 1;\n', "lang": "code"})
    assert "ＡＢ" in code["text"]
    with pytest.raises(ValueError):
        format_document({"content": "no text"})


# -- rule filters ------------------------------------------------------------------------------

RF = RuleFilter()


def test_clean_documents_are_kept():
    assert RF.check(_en(EN_PROSE)) is None
    assert RF.check(_zh(ZH_NEWS)) is None
    assert RF.check({"text": EN_PROSE}) is None  # language detected when absent


def test_reason_format():
    reason = RF.check(_en("Short text, the end."))
    assert re.fullmatch(r"[a-z0-9_]+: [\w()<=]+=[\d.]+ [<>] [\d.]+", reason), reason
    assert reason == "length: words=4 < 50"


REMOVED_EN = {
    "repeated_lines": ("\n".join(["Subscribe to our newsletter for weekly garden updates."] * 20
                                 + _sentences(5)), {"gopher_repetition"}),
    "repeated_paragraphs": ("\n\n".join([" ".join(_sentences(4, 1))] * 3 + [" ".join(_sentences(4, 2))]),
                            {"gopher_repetition"}),
    "keyword_stuffing": (" ".join(f"running shoes {w} running shoes" for w in _NOUN * 3)
                         + " and the end of the list.", {"gopher_top_ngram", "gopher_dup_ngram"}),
    "link_spam": ("\n".join(f"Visit http://deals{i}.example.com/best-watch-{i * 7}?ref=spam{i}"
                            for i in range(40)), None),
    "mojibake": (EN_PROSE.replace("'", "â€™").replace("the", "thÃ©"), {"abnormal_chars"}),
    "replacement_chars": (EN_PROSE.replace("a", "\ufffd", 20), {"abnormal_chars"}),
    "private_use": (EN_PROSE.replace("e", "\ue000", 10), {"abnormal_chars"}),
    "lorem_ipsum": ((LOREM + "\n") * 1 + EN_PROSE, {"c4_lorem_ipsum"}),
    "no_stop_words": ("\n".join(
        f"{a.capitalize()} {n} {v} {a2} {n2} beside {n3}."
        for a, n, v, a2, n2, n3 in zip(_ADJ, _NOUN, _VERB * 2, reversed(_ADJ), reversed(_NOUN), _NOUN[3:] + _NOUN[:3])),
        {"stop_words"}),
    "giant_line": (" ".join(_prose(250, 3)), {"line_breaks"}),
    "very_short": ("The end of the story.", {"length"}),
    "short_lines_menu": ("\n".join(f"{a} {n}" for a in _ADJ[:6] for n in _NOUN[:6])
                         + "\nthe and of to", {"line_breaks"}),
    "bullets": ("\n".join("• " + s for s in _prose(15, 4)), {"bullet_lines"}),
    "ellipsis": ("\n".join(s[:-1] + " ..." for s in _prose(15, 5)), {"ellipsis_lines"}),
    "hashtags": (" ".join(s + " #" + " #".join(_prose(1, i)[0].split()[:3]) for i, s in
                          enumerate(_prose(10, 6))), {"symbol_ratio"}),
    "numbers": ("Results of the season with the scores of each match.\n"
                + "\n".join(" ".join(str(1000 + 37 * i + j) for j in range(12)) + "." for i in range(8)),
                {"alpha_words"}),
    "short_words": (" ".join(a + b for a, b in zip(random.Random(0).choices("abcdefghijklmnop", k=150),
                                                    random.Random(1).choices("aeiou", k=150)))
                    + " the and of to.", {"mean_word_length"}),
    "no_sentence_ends": ("\n".join(s[:-1] for s in _prose(12, 7)), {"punctuation"}),
    "boilerplate": (EN_PROSE + "\nThis website uses cookies to improve your experience.\n"
                    "Please enable JavaScript in your browser to view this page.\nPrivacy Policy",
                    {"c4_boilerplate"}),
    "curly_braces": (EN_PROSE + "\n" + 'var cfg = {"a": {"b": {"c": 1}}, "d": {"e": 2}};' * 2,
                     {"c4_curly_braces"}),
}


@pytest.mark.parametrize("name", sorted(REMOVED_EN))
def test_english_documents_removed(name):
    text, rules = REMOVED_EN[name]
    reason = RF.check(_en(text))
    assert reason is not None, name
    if rules is not None:
        assert _rule(reason) in rules, (name, reason)


def test_chinese_rules():
    assert RF.check(_zh(ZH_NEWS)) is None
    assert RF.check(_zh(ZH_AD)) is not None
    assert _rule(RF.check(_zh("记者从国家统计局了解到。"))) == "length"
    lines = ZH_NEWS.split("\n")
    assert _rule(RF.check(_zh("\n".join([lines[0]] * 6 + lines[1:])))) == "gopher_repetition"
    no_punct = re.sub("[，。、]", " ", ZH_NEWS)
    assert _rule(RF.check(_zh(no_punct))) == "punctuation"
    assert _rule(RF.check(_zh(ZH_NEWS + "锟斤拷锟斤拷烫烫烫"))) == "abnormal_chars"
    no_function_words = re.sub("[的了是在和也就不这那我你他她它们与及为对都而被把从但之以其或所并着过吗呢吧]", "", ZH_NEWS)
    assert _rule(RF.check(_zh(no_function_words))) == "stop_words"
    stuffed = "，".join(["优惠券优惠券免费领取"] * 30) + "。"
    assert _rule(RF.check(_zh(stuffed))) in {"gopher_top_ngram", "gopher_dup_ngram", "stop_words"}
    mostly_latin = ZH_NEWS[:60] + " ".join(_sentences(10))
    assert _rule(RF.check(_zh(mostly_latin))) == "cjk_fraction"
    # One huge line with no breaks (5000+ characters) and many tiny lines.
    assert RF.check(_zh("".join(_zh_prose(30)))) is None
    assert RF.check(_zh("".join(_zh_prose(400)))).startswith("line_breaks: max_line_chars")
    tiny = "\n".join(s[:8] + "。" for s in _zh_prose(40, 1))
    assert _rule(RF.check(_zh(tiny))) == "line_breaks"


def test_chinese_uses_character_ngrams():
    s = TextStats("我们在北京。Hello world!")
    assert s.words == ["我", "们", "在", "北", "京", "Hello", "world"]
    t = DEFAULT_THRESHOLDS["zh"]
    assert gopher_dup_ngram(TextStats(ZH_NEWS), t) is None
    assert gopher_dup_ngram(TextStats(ZH_NEWS + ZH_NEWS[:150]), t) is not None


def test_code_bypasses_prose_rules():
    code = {"text": PY_CODE, "lang": "code"}
    assert RF.check(code) is None
    assert RF.check({"text": PY_CODE, "lang": "en"}) is not None
    assert _rule(RF.check({"text": PY_CODE.replace("o", "\ufffd"), "lang": "code"})) == "abnormal_chars"


def test_other_language_uses_generic_rules():
    fr = ("Le moulin de la petite ville recevait chaque automne le grain des fermes voisines. "
          "Le meunier notait avec soin chaque sac dans un grand registre, conservé aujourd'hui "
          "aux archives du département. Ces registres montrent comment les récoltes changeaient "
          "d'une année à l'autre et comment les familles arrivaient ou quittaient la vallée. "
          "Les historiens les utilisent pour étudier l'effet du chemin de fer, arrivé en 1871.")
    assert RF.check({"text": fr, "lang": "other"}) is None
    assert _rule(RF.check({"text": "\n".join([fr] * 4), "lang": "other"})) == "gopher_repetition"


def test_rule_filter_config():
    assert _rule(RuleFilter({"en": {"min_words": 500}}).check(_en(EN_PROSE))) == "length"
    assert _rule(RuleFilter({"all": {"max_line_chars": 50}}).check(_zh(ZH_NEWS))) == "line_breaks"
    assert _rule(RuleFilter({"zh": {"min_chars": 1000}}).check(_zh(ZH_NEWS))) == "length"
    lorem = _en(LOREM + "\n" + EN_PROSE)
    assert RuleFilter({"disable": ["c4_lorem_ipsum"]}).check(lorem) != RF.check(lorem)
    toml_like = {"en": {"top_ngram_fracs": [[2, 0.01]], "dup_ngram_fracs": []}}
    assert _rule(RuleFilter(toml_like).check(_en(EN_PROSE))) == "gopher_top_ngram"
    syn = {"text": "Q: 1+1?\nA: 2.", "lang": "en", "source": "synthetic_en"}
    assert RF.check(syn) is not None and RuleFilter({"skip_sources": ["synthetic_en"]}).check(syn) is None
    with pytest.raises(ValueError, match="min_wordz"):
        RuleFilter({"en": {"min_wordz": 3}})
    with pytest.raises(ValueError, match="nope"):
        RuleFilter({"disable": ["nope"]})
    with pytest.raises(ValueError, match="fr"):
        RuleFilter({"fr": {}})
    assert set(RULES) >= {"length", "gopher_repetition", "gopher_top_ngram", "gopher_dup_ngram",
                          "abnormal_chars", "punctuation", "line_breaks", "stop_words"}


def test_strip_boilerplate_lines():
    text = "Real content line.\nWe use cookies on this site.\nPlease enable JavaScript to continue.\nMore."
    out, n = strip_boilerplate_lines(text)
    assert n == 2 and out == "Real content line.\nMore."


# -- safety --------------------------------------------------------------------------------------

def test_safety_domains():
    sf = SafetyFilter(domain_blocklist=["bad.example", "*.evil.test"], word_blocklist={})
    for url in ("http://bad.example/x", "https://www.bad.example/page?q=1", "http://a.b.bad.example:8080/",
                "bad.example/no-scheme", "HTTPS://BAD.EXAMPLE.", "https://x.evil.test/"):
        r = sf.check({"text": EN_PROSE, "url": url})
        assert r and r.startswith("safety_domain:") and ("'bad.example'" in r or "'evil.test'" in r), url
    for url in ("https://notbad.example/", "https://bad.example.org/", "https://example/", "", None,
                "http://[::1"):
        assert sf.check({"text": EN_PROSE, "url": url}) is None, url
    default = SafetyFilter()
    assert default.check({"text": EN_PROSE, "url": "https://www.pornhub.com/view"}) is not None


def test_safety_words_boundaries():
    sf = SafetyFilter(domain_blocklist=[], word_blocklist={"en": ["ass", "online casino"], "zh": ["赌博"]})
    assert sf.check(_en("The class assignment was passed by the brass band.")) is None
    assert sf.check(_en("Don't be an ASS about it.")) == "safety_word: en 'ass'"
    assert sf.check(_en("Play at our online\ncasino today.")) == "safety_word: en 'online casino'"
    assert sf.check(_en("Online casinos are regulated.")) is None  # whole tokens only
    assert sf.check(_zh("他们在网上赌博平台输了很多钱。")) == "safety_word: zh '赌博'"
    assert sf.check(_zh("买ass药")) is not None  # an English entry next to Chinese characters
    assert sf.check({"text": "class Ass: pass", "lang": "code"}) is None
    assert SafetyFilter(word_blocklist={"en": ["ass"]}, check_code_words=True).check(
        {"text": "x = ass", "lang": "code"}) is not None
    default = SafetyFilter()
    assert default.check(_en("Cheap viagra here.")) is not None
    assert default.check(_en(EN_PROSE)) is None and default.check(_zh(ZH_NEWS)) is None


def test_safety_classifier_hook(tmp_path):
    def toxic(text):
        return 0.7

    assert SafetyFilter(classifiers=[toxic], threshold=0.8).check(_en(EN_PROSE)) is None
    r = SafetyFilter(classifiers=[toxic], threshold=0.6).check(_en(EN_PROSE))
    assert r == "safety_classifier: toxic p=0.700 >= 0.60"
    r = SafetyFilter(classifiers=[("nsfw", toxic, 0.5)], threshold=0.99).check(_en(EN_PROSE))
    assert r.startswith("safety_classifier: nsfw")
    assert SafetyFilter(classifiers=[(toxic, 0.9)]).check(_en(EN_PROSE)) is None
    # From a config table: lists from files, a scorer by import path ("builtins:len" >= 10).
    (tmp_path / "domains.txt").write_text("# comment\nbad.example\n\n")
    (tmp_path / "zh.txt").write_text("赌博\n")
    sf = SafetyFilter.from_config({"domain_blocklist": str(tmp_path / "domains.txt"),
                                   "word_blocklist": {"zh": str(tmp_path / "zh.txt")},
                                   "classifiers": [{"name": "length", "scorer": "builtins:len",
                                                    "threshold": 10}]})
    assert sf.check({"text": "短", "url": "http://m.bad.example"}).startswith("safety_domain")
    assert sf.check({"text": "赌博"}).startswith("safety_word")
    assert sf.check({"text": "a long enough text"}).startswith("safety_classifier: length")
    assert sf.check({"text": "short"}) is None


# -- quality -----------------------------------------------------------------------------------

def _toy_task(n: int, seed: int):
    rng = random.Random(seed)
    ad_bits = ["Buy now", "50% off", "free shipping", "click here", "limited time offer",
               "call 555-{:03d}-{:04d}", "only ${}.99", "visit www.shop{}.example.com",
               "order today", "best price guaranteed", "点击购买", "限时优惠", "包邮"]
    texts, labels = [], []
    for i in range(n):
        if i % 2:
            texts.append(" ".join(_sentences(rng.randint(2, 5), seed * 1000 + i)))
            labels.append(1)
        else:
            parts = []
            for _ in range(rng.randint(3, 7)):
                bit = rng.choice(ad_bits)
                parts.append(bit.format(rng.randint(1, 999), rng.randint(0, 9999)) + "!")
                if rng.random() < 0.3:  # some prose words in ads too
                    parts.append(f"{rng.choice(_ADJ)} {rng.choice(_NOUN)}")
            texts.append(" ".join(parts))
            labels.append(0)
    return texts, labels


def test_quality_classifier_learns_and_round_trips(tmp_path):
    texts, labels = _toy_task(400, seed=1)
    model = QualityClassifier(n_buckets=1 << 16).train(texts[:300], labels[:300], epochs=8, seed=0)
    acc = model.accuracy(texts[300:], labels[300:])
    assert acc >= 0.9, acc
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.npz"]
    again = QualityClassifier.load(tmp_path / "m")
    p1, p2 = model.predict_proba(texts[300:]), again.predict_proba(texts[300:])
    assert np.array_equal(p1, p2)
    qf = QualityFilter(model=str(tmp_path / "m"), threshold=0.5)
    assert qf.check(_en(EN_PROSE)) is None
    r = qf.check(_en("Buy now! 50% off, free shipping, click here! Call 555-123-4567!"))
    assert r and r.startswith("quality_model: p_good=")
    assert QualityFilter(model=again).check({"text": PY_CODE, "lang": "code"}) is None
    from_cfg = QualityFilter.from_config({"model": str(tmp_path / "m"), "threshold": 0.999})
    assert from_cfg.check(_en(EN_PROSE)).startswith("quality_model")
    with pytest.raises(ValueError, match="treshold"):
        QualityFilter.from_config({"treshold": 0.5})
    with pytest.raises(FileNotFoundError):
        QualityClassifier.load(tmp_path / "missing")


def test_train_classifier_cli(tmp_path, capsys):
    texts, labels = _toy_task(200, seed=2)
    data = tmp_path / "labelled.jsonl"
    names = {1: "good", 0: "ad"}
    lines = [json.dumps({"text": t, "label": names[y] if i % 3 else y}) for i, (t, y) in
             enumerate(zip(texts, labels))]
    lines.insert(5, "{not json")
    lines.insert(9, json.dumps({"text": "x", "label": "maybe"}))
    data.write_text("\n".join(lines) + "\n")
    parser = argparse.ArgumentParser()
    data_sub = parser.add_subparsers(dest="data_command")
    add_cli(data_sub)
    args = parser.parse_args(["train-classifier", "--input", str(data), "--output",
                              str(tmp_path / "model"), "--buckets", "65536", "--epochs", "8"])
    assert args.func(args) == 0
    out = capsys.readouterr()
    acc = float(re.search(r"held-out accuracy: ([\d.]+)", out.out).group(1))
    assert acc >= 0.9
    assert "labelled.jsonl:6" in out.err and "labelled.jsonl:10" in out.err
    cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    assert cfg["metrics"]["heldout_accuracy"] == acc and cfg["metrics"]["n_heldout"] == 20


def test_parse_label():
    assert [parse_label(x) for x in (1, 0, True, "good", "bad", "ad", "Spam", "1", "high")] == \
        [1, 0, 1, 1, 0, 0, 0, 1, 1]
    with pytest.raises(ValueError):
        parse_label("perhaps")


def test_quality_rule_fallback():
    qf = QualityFilter()
    assert qf.check(_en(EN_PROSE)) is None
    assert qf.check(_zh(ZH_NEWS)) is None
    assert _rule(qf.check(_zh(ZH_AD))) == "quality_ad"
    links = "\n".join(f"Best deals at http://shop{i}.example.com call 555-010-{1000 + i}" for i in range(10))
    assert _rule(qf.check(_en(links))) == "quality_ad"
    news_with_prices = ("The new phone costs $999, the larger model $1,099 and the tablet $329. "
                        + " ".join(_sentences(10)))
    assert qf.check(_en(news_with_prices)) is None
    shouting = " ".join(s.upper() for s in _sentences(6))
    assert qf.check(_en(shouting)).startswith("quality_fluency: upper_frac")
    listing = " ".join(f"{a} {n}" for a, n in zip(_ADJ, _NOUN)) + " " + " ".join(_VERB)
    assert qf.check(_en(listing)).startswith("quality_fluency: stop_word_ratio")
    stuffing = " ".join(f"The garden hose is here and a garden hose of {n} with the hose."
                        for n in _NOUN[:8])
    assert _rule(qf.check(_en(stuffing))) == "quality_stuffing"
    zh_stuffing = "。".join(f"北京旅游攻略北京旅游景点的北京旅游路线{i}" for i in range(6)) + "。"
    assert _rule(qf.check(_zh(zh_stuffing))) == "quality_stuffing"
    assert qf.check({"text": PY_CODE, "lang": "code"}) is None
    assert QualityFilter(skip_sources=["syn"]).check({"text": ZH_AD, "lang": "zh", "source": "syn"}) is None
    assert _rule(rule_quality(ZH_AD, "zh", QualityRules(min_ad_cues=100))) == "quality_fluency"
