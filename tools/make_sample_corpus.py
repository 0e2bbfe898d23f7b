#!/usr/bin/env python3
"""Generate Odyssey's bilingual (English + Korean) sample corpus from templates; no downloaded text.

    python tools/make_sample_corpus.py                          # -> data/sample/ (the shipped corpus)
    python tools/make_sample_corpus.py --style letters --out X  # a second, different corpus
    python tools/make_sample_corpus.py --style instructions     # -> data/sample-instructions/ (shipped)

Three styles, all deterministic per seed (Python's `random.Random`, stable across versions):

- `stories` (TinyStories-like): short children's stories. A story is a *plan* (a hero, a friend, a
  place, an object, a time of day, one of eight plots) rendered in English or Korean; every
  sentence has several parallel variants, so the combinations are many but the language stays
  simple enough for a small model to learn. Korean is written in the polite narrative style
  (해요체: "...있었어요") with particles chosen by the final consonant (이/가, 은/는, 을/를, 와/과...).
- `letters`: letters to relatives and diary entries (dates, weather, school, food, plans). Other
  vocabulary and structure than the stories, and the Korean diaries use the plain style (했다체),
  so a model trained on the stories clearly has something left to learn (the LoRA test uses it).
- `instructions`: chat records (`{"messages": [user, assistant, ...], "lang": "en"|"ko"}`) of
  questions about new stories: the first user turn quotes a story's beginning and asks one question;
  1-3 questions a record (multi-turn). Questions read the story plan's fields (the hero, the hero's
  kind, the friend, the place, the time of day, the plot's object or event) and are asked only when
  the quoted text holds the answer's key words, so the story determines every answer.

Files written to --out: `{style}_en.txt` and `{style}_ko.txt` (documents separated by a line
`<|endoftext|>`, paragraphs by blank lines) and `{style}_mixed.jsonl` (one JSON object per line with
`text` and `lang` in en|ko|en+ko; en+ko documents hold a story and its translation). The mixed file
holds other documents than the .txt files, so a directory-wide split never leaks across files.
For `instructions`: `instructions_en.jsonl` and `instructions_ko.jsonl` (N records each, default
200) and `instructions_eval.jsonl` (N/5 of each language about other stories, held out). They go
to their own directory: `prepare-data data/sample` reads the stories as text.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

EOT = "<|endoftext|>"


# --------------------------------------------------------------------------------------------
# Korean particles: the form depends on whether the last syllable has a final consonant (batchim)


def _batchim(word: str) -> int:
    """Index of the final consonant of the last Hangul syllable of `word`; 0 = none (or no Hangul)."""
    for ch in reversed(word):
        if "가" <= ch <= "힣":
            return (ord(ch) - 0xAC00) % 28
        if not ch.isspace():
            return 0
    return 0


_RIEUL = 8  # ㄹ as a final consonant: takes 로 (not 으로)


class Ko:
    """A Korean noun with its particles as attributes, for str.format: "{A.eun}" -> "지우는".

    Given names ending in a consonant take the affectionate 이 before particles (민준 -> 민준이는),
    as children's stories do; `raw` keeps the bare name, `a` is the vocative (민준아, 지우야).
    """

    def __init__(self, word: str, person: bool = False):
        self.raw = word
        self.base = word + "이" if person and _batchim(word) else word
        self.person = person

    def _pick(self, with_final: str, without: str, word: str | None = None) -> str:
        word = self.base if word is None else word
        return word + (with_final if _batchim(word) else without)

    def __str__(self):
        return self.base

    eun = property(lambda s: s._pick("은", "는"))
    i = property(lambda s: s._pick("이", "가"))
    eul = property(lambda s: s._pick("을", "를"))
    gwa = property(lambda s: s._pick("과", "와"))
    rang = property(lambda s: s._pick("이랑", "랑"))
    ieyo = property(lambda s: s._pick("이에요", "예요"))
    ieosseoyo = property(lambda s: s._pick("이었어요", "였어요"))
    ui = property(lambda s: s.base + "의")
    ege = property(lambda s: s.base + "에게")
    do = property(lambda s: s.base + "도")
    a = property(lambda s: s._pick("아", "야", s.raw))
    iya = property(lambda s: s._pick("이야", "야", s.raw))
    ra = property(lambda s: s._pick("이라는", "라는", s.raw))

    @property
    def euro(self) -> str:
        b = _batchim(self.base)
        return self.base + ("으로" if b and b != _RIEUL else "로")


def _an(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _en_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# --------------------------------------------------------------------------------------------
# story vocabulary: (English, Korean) pairs
# (vocabulary tables and templates, laid out by hand: one table row a line)
# fmt: off

GIRLS = [("Lily", "지우"), ("Mia", "서연"), ("Sara", "하은"), ("Anna", "수아"), ("Emma", "지민"),
         ("Lucy", "예린"), ("Zoe", "유나"), ("Ella", "소윤"), ("Ruby", "채원"), ("Chloe", "다은"),
         ("Nora", "민서"), ("Amy", "은비")]
BOYS = [("Tom", "민준"), ("Ben", "하준"), ("Leo", "도윤"), ("Sam", "서준"), ("Jack", "시우"),
        ("Finn", "예준"), ("Noah", "준우"), ("Owen", "지호"), ("Liam", "현우"), ("Max", "건우"),
        ("Eli", "태민"), ("Luke", "우진")]
PET_NAMES = [("Toto", "토토"), ("Bella", "콩이"), ("Milo", "보리"), ("Coco", "초코"), ("Daisy", "두부"),
             ("Pip", "모모"), ("Rosie", "뭉치"), ("Buddy", "구름이"), ("Sunny", "별이"), ("Pepper", "호두"),
             ("Button", "단추"), ("Honey", "꿀비")]
ANIMALS = [("cat", "고양이"), ("dog", "강아지"), ("rabbit", "토끼"), ("bear", "곰"), ("bird", "새"),
           ("fox", "여우"), ("duck", "오리"), ("frog", "개구리"), ("mouse", "생쥐"), ("turtle", "거북이"),
           ("squirrel", "다람쥐"), ("elephant", "코끼리"), ("lion", "사자"), ("pig", "돼지"),
           ("owl", "부엉이"), ("hedgehog", "고슴도치")]
ADJECTIVES = [("kind", "착한"), ("brave", "용감한"), ("curious", "호기심 많은"), ("shy", "수줍음 많은"),
              ("cheerful", "명랑한"), ("clever", "똑똑한"), ("gentle", "다정한"), ("little", "작은"),
              ("playful", "장난기 많은"), ("quiet", "조용한"), ("busy", "부지런한"), ("funny", "재미있는")]
# (English noun, preposition for "in the park"/"at the beach", Korean)
PLACES = [("park", "in", "공원"), ("forest", "in", "숲"), ("beach", "at", "바닷가"),
          ("garden", "in", "정원"), ("farm", "on", "농장"), ("riverbank", "by", "강가"),
          ("hill", "on", "언덕"), ("playground", "at", "놀이터"), ("lake", "by", "호숫가"),
          ("meadow", "in", "들판"), ("backyard", "in", "뒷마당"), ("village square", "in", "마을 광장"),
          ("school yard", "in", "학교 운동장"), ("zoo", "at", "동물원"), ("market", "at", "시장"),
          ("mountain", "on", "산"), ("orchard", "in", "과수원"), ("harbor", "at", "항구")]
OBJECTS = [("ball", "공"), ("kite", "연"), ("red balloon", "빨간 풍선"), ("toy car", "장난감 자동차"),
           ("picture book", "그림책"), ("straw hat", "밀짚모자"), ("shiny stone", "반짝이는 돌"),
           ("yellow flower", "노란 꽃"), ("little box", "작은 상자"), ("blue cup", "파란 컵"),
           ("umbrella", "우산"), ("small drum", "작은 북"), ("doll", "인형"), ("golden key", "황금 열쇠"),
           ("seashell", "조개껍데기"), ("paper boat", "종이배"), ("box of crayons", "크레파스 상자"),
           ("warm blanket", "따뜻한 담요"), ("teddy bear", "곰 인형"), ("little bell", "작은 종"),
           ("white feather", "하얀 깃털"), ("green marble", "초록 구슬"), ("music box", "오르골"),
           ("scarf", "목도리"), ("toy robot", "장난감 로봇"), ("whistle", "호루라기"),
           ("wooden horse", "나무 말"), ("orange ribbon", "주황색 리본")]
WHEN = [("One sunny morning", "어느 화창한 아침"), ("One rainy afternoon", "비가 내리던 어느 오후"),
        ("One windy day", "바람이 많이 부는 어느 날"), ("One snowy evening", "눈이 내리던 어느 저녁"),
        ("One warm spring day", "따뜻한 어느 봄날"), ("One cool autumn morning", "선선한 어느 가을 아침"),
        ("One hot summer day", "무더운 어느 여름날"), ("One quiet Sunday", "조용한 어느 일요일"),
        ("One cloudy morning", "구름이 잔뜩 낀 어느 아침"), ("One bright afternoon", "햇살이 밝은 어느 오후")]
SCENERY = [("The sun was warm and the birds were singing.", "햇살은 따뜻했고 새들이 노래하고 있었어요."),
           ("The sky was blue and the wind was soft.", "하늘은 파랗고 바람은 부드러웠어요."),
           ("Little clouds moved slowly across the sky.", "작은 구름들이 하늘을 천천히 지나가고 있었어요."),
           ("The leaves were red and yellow.", "나뭇잎들은 빨갛고 노랬어요."),
           ("Everything smelled like fresh grass.", "모든 곳에서 싱그러운 풀 냄새가 났어요."),
           ("Butterflies were dancing over the flowers.", "나비들이 꽃 위에서 춤을 추고 있었어요."),
           ("It was a little cold, so everyone wore warm clothes.", "조금 추워서 모두 따뜻한 옷을 입고 있었어요."),
           ("The air was fresh after the rain.", "비가 그친 뒤라 공기가 상쾌했어요.")]
SPOTS = [("under a big leaf", "커다란 나뭇잎 아래"), ("behind a rock", "바위 뒤"), ("in a bush", "덤불 속"),
         ("next to the fence", "울타리 옆"), ("under the bench", "벤치 아래"), ("near the pond", "연못 근처"),
         ("in the tall grass", "키 큰 풀숲"), ("behind the old tree", "오래된 나무 뒤"),
         ("inside a flower pot", "화분 안"), ("under a pile of leaves", "낙엽 더미 아래")]
FEARS = [("the dark", "어둠"), ("thunder", "천둥소리"), ("the big slide", "커다란 미끄럼틀"),
         ("deep water", "깊은 물"), ("the tall ladder", "높은 사다리"), ("the loud dog next door", "옆집의 시끄러운 개"),
         ("the old bridge", "낡은 다리"), ("the buzzing bees", "윙윙거리는 벌"), ("the big swing", "커다란 그네")]
GAMES = [("hide and seek", "숨바꼭질"), ("tag", "술래잡기"), ("catch", "공놀이"),
         ("a guessing game", "수수께끼 놀이"), ("pirates", "해적 놀이"), ("house", "소꿉놀이"),
         ("a clapping game", "손뼉 치기 놀이")]
FOODS = [("a big red apple", "커다란 빨간 사과"), ("a box of cookies", "쿠키 한 상자"),
         ("a bag of candy", "사탕 한 봉지"), ("a slice of watermelon", "수박 한 조각"),
         ("a warm sweet potato", "따뜻한 고구마"), ("a jar of honey", "꿀 한 병"),
         ("a basket of strawberries", "딸기 한 바구니"), ("a piece of rice cake", "떡 한 조각")]
PROJECTS = [("a sandcastle", "모래성"), ("a tower of blocks", "블록 탑"), ("a tree house", "나무집"),
            ("a snowman", "눈사람"), ("a bird house", "새집"), ("a paper plane", "종이비행기"),
            ("a rocket out of boxes", "상자 로켓"), ("a little boat", "작은 배"), ("a big puzzle", "커다란 퍼즐")]
SPOILERS = [("a big wave came and washed it away", "커다란 파도가 밀려와 모든 것을 쓸어가 버렸어요"),
            ("a strong wind blew it down", "강한 바람이 불어 와르르 무너져 버렸어요"),
            ("a puppy ran by and knocked it over", "강아지 한 마리가 뛰어가다가 그것을 넘어뜨렸어요"),
            ("it started to rain and everything got wet", "비가 내리기 시작해서 모든 것이 젖어 버렸어요"),
            ("one piece was missing and it fell apart", "조각 하나가 빠져서 그만 무너지고 말았어요")]
TREASURES = [("a tiny golden ring", "작은 금반지"), ("an old map of the village", "마을의 낡은 지도"),
             ("a note that said, \"Be kind every day.\"", "\"매일 친절하게 지내요.\"라고 적힌 쪽지"),
             ("a handful of colorful buttons", "알록달록한 단추 한 움큼"),
             ("a music box that played a sweet song", "달콤한 노래가 나오는 오르골"),
             ("seeds for a magic garden", "마법 정원의 씨앗"),
             ("a photo of a smiling family", "웃고 있는 가족의 사진"),
             ("a small star that glowed in the dark", "어둠 속에서 빛나는 작은 별")]
# (problem EN, problem KO, fix EN, fix KO)
HELP = [
    ("a little bird had fallen out of its nest", "작은 새 한 마리가 둥지에서 떨어져 있었어요",
     "{A} gently picked up the bird and put it back in its nest.",
     "{A.eun} 조심스럽게 새를 들어 올려 둥지에 다시 넣어 주었어요."),
    ("a kitten was stuck high up in a tree", "아기 고양이 한 마리가 높은 나무 위에서 내려오지 못하고 있었어요",
     "{A} brought a long ladder and helped the kitten climb down.",
     "{A.eun} 긴 사다리를 가져와서 아기 고양이가 내려오도록 도와주었어요."),
    ("an old man was carrying a heavy basket of apples",
     "할아버지 한 분이 무거운 사과 바구니를 들고 힘들게 걸어가고 계셨어요",
     "{A} helped him carry the basket all the way home.",
     "{A.eun} 할아버지를 도와 바구니를 집까지 함께 들어 드렸어요."),
    ("a baby duck could not find its mother", "아기 오리 한 마리가 엄마를 찾지 못하고 있었어요",
     "{A} walked with the baby duck along the water until they found its mother.",
     "{A.eun} 아기 오리와 함께 물가를 따라 걸어가서 엄마 오리를 찾아 주었어요."),
    ("a little girl had dropped all her oranges", "한 여자아이가 오렌지를 모두 땅에 떨어뜨리고 말았어요",
     "{A} picked up every orange and put them back in her bag.",
     "{A.eun} 오렌지를 하나하나 주워서 가방에 다시 담아 주었어요."),
    ("a small turtle had rolled onto its back", "작은 거북이 한 마리가 뒤집혀서 버둥거리고 있었어요",
     "{A} slowly turned the turtle over onto its feet.",
     "{A.eun} 천천히 거북이를 다시 바로 뒤집어 주었어요."),
]
BAKES = [("cookies", "쿠키"), ("bread", "빵"), ("apple pie", "사과 파이"), ("muffins", "머핀"), ("pancakes", "팬케이크"),
         ("rice cakes", "떡")]


class Plan:
    """One story's choices; `en` and `ko` are the format contexts for the two languages."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.en, self.ko = {}, {}
        self._character("A", rng)
        while True:
            self._character("B", rng)
            if self.en["B"] != self.en["A"] and self.ko["B"].raw != self.ko["A"].raw:
                break
        place_en, prep, place_ko = rng.choice(PLACES)
        obj_en, obj_ko = rng.choice(OBJECTS)
        when_en, when_ko = rng.choice(WHEN)
        adj_en, adj_ko = rng.choice(ADJECTIVES)
        self.en.update(place=place_en, at_place=f"{prep} the {place_en}", obj=obj_en, a_obj=_an(obj_en),
                       When=when_en, adj=adj_en)
        self.ko.update(place=place_ko, obj=Ko(obj_ko), when=when_ko, adj=adj_ko)
        self.en["scenery"], self.ko["scenery"] = rng.choice(SCENERY)

    def _character(self, key: str, rng: random.Random) -> None:
        r = rng.random()
        if r < 0.5:
            girl = r < 0.25
            name_en, name_ko = rng.choice(GIRLS if girl else BOYS)
            kind_en, kind_ko = ("girl", "여자아이") if girl else ("boy", "남자아이")
            he = "she" if girl else "he"
            title_ko = "친구"
        else:
            name_en, name_ko = rng.choice(PET_NAMES)
            kind_en, kind_ko = rng.choice(ANIMALS)
            he = rng.choice(["she", "he"])
            title_ko = kind_ko
        him, his = {"she": ("her", "her"), "he": ("him", "his")}[he]
        e, k = self.en, self.ko
        e[key], e[key + "kind"] = name_en, kind_en
        e[key + "he"], e[key + "He"] = he, he.capitalize()
        e[key + "him"], e[key + "his"], e[key + "His"] = him, his, his.capitalize()
        e[key + "desc"] = f"{_an(kind_en)} named {name_en}"
        k[key] = Ko(name_ko, person=True)
        k[key + "kind"] = Ko(kind_ko)
        k[key + "title"] = title_ko


class Story:
    """Collects parallel sentences; `say` picks one variant (same index for both languages)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.paragraphs: list[list[tuple[str, str]]] = [[]]

    def say(self, *variants: tuple[str, str]) -> None:
        en, ko = variants[self.plan.rng.randrange(len(variants))]
        self.paragraphs[-1].append((en.format(**self.plan.en), ko.format(**self.plan.ko)))

    def maybe(self, p: float, *variants: tuple[str, str]) -> None:
        if self.plan.rng.random() < p:
            self.say(*variants)

    def paragraph(self) -> None:
        if self.paragraphs[-1]:
            self.paragraphs.append([])

    def render(self, lang: int) -> str:
        return "\n\n".join(" ".join(s[lang] for s in p) for p in self.paragraphs if p)


def _opening(s: Story) -> None:
    s.say(("Once upon a time, there was {adj_a} {Akind} named {A}.",
           "옛날 옛적에 {A.ra} {adj} {Akind.i} 있었어요."),
          ("There once was {adj_a} {Akind} named {A}.", "{A.ra} {adj} {Akind.i} 살고 있었어요."),
          ("{A} was {adj_a} {Akind}.", "{A.eun} {adj} {Akind.ieosseoyo}."))
    s.maybe(0.6, ("{A} loved to play {at_place}.", "{A.eun} {place}에서 노는 것을 정말 좋아했어요."),
            ("Every day, {A} went to the {place} to play.", "{A.eun} 매일 {place}에 가서 놀았어요."),
            ("{AHe} lived near the {place} with {Ahis} family.", "{A.eun} 가족과 함께 {place} 근처에 살았어요."))


def _plot_lost(s: Story) -> None:
    s.say(("{A} had {a_obj} that {Ahe} loved very much.", "{A.ege}는 아주 아끼는 {obj.i} 있었어요."),
          ("{A}'s favorite toy was {a_obj}.", "{A.ui} 가장 소중한 보물은 {obj.ieosseoyo}."))
    s.maybe(0.5, ("{AHe} took it everywhere {Ahe} went.", "{A.eun} 어디를 가든 {obj.eul} 꼭 가지고 다녔어요."))
    s.paragraph()
    s.say(("{When}, {A} went to the {place} with {Ahis} {obj}.", "{when}, {A.eun} {obj.eul} 가지고 {place}에 갔어요."),
          ("{When}, {A} took the {obj} to the {place}.", "{when}에 {A.eun} {obj.eul} 들고 {place}{place_e} 나갔어요."))
    s.maybe(0.5, ("{scenery}", "{scenery}"))
    s.say(("{AHe} played for a long time. When {Ahe} looked around, the {obj} was gone!",
           "{A.eun} 한참 동안 신나게 놀았어요. 그런데 주위를 둘러보니 {obj.i} 없어졌어요!"),
          ("After a while, {A} reached for the {obj}, but it was not there!",
           "얼마 뒤 {A.i} {obj.eul} 찾았지만, 어디에도 없었어요!"))
    s.say(("{A} felt very sad. \"Where is my {obj}?\" {Ahe} cried.",
           "{A.eun} 너무 슬펐어요. \"내 {obj.i} 어디 갔지?\" 하고 {A.i} 울먹였어요."),
          ("{A} was so sad that {Ahe} began to cry.", "{A.eun} 너무 슬퍼서 눈물이 났어요."))
    s.paragraph()
    s.say(("Just then, {Bdesc} came by.", "그때 {Btitle} {B.i} 다가왔어요."),
          ("Soon {Bdesc} walked over.", "곧 {Btitle} {B.i} 걸어왔어요."))
    s.say(("\"Why are you sad, {A}?\" asked {B}.", "\"{A.a}, 왜 슬퍼?\" 하고 {B.i} 물었어요."),
          ("\"What is wrong, {A}?\" {B} asked.", "\"{A.a}, 무슨 일이야?\" {B.i} 물었어요."))
    s.say(("\"I lost my {obj},\" said {A}.", "\"내 {obj.eul} 잃어버렸어.\" {A.i} 말했어요."),
          ("\"I can't find my {obj} anywhere,\" {A} said.", "\"{obj.eul} 아무리 찾아도 없어.\" 하고 {A.i} 대답했어요."))
    s.say(("\"Don't worry. I will help you look for it,\" said {B}.",
           "\"걱정하지 마. 내가 같이 찾아 줄게.\" 하고 {B.i} 말했어요."),
          ("{B} smiled. \"Let's look for it together!\"", "{B.eun} 웃으며 말했어요. \"우리 같이 찾아보자!\""))
    spots = s.plan.rng.sample(SPOTS, 4)  # three searched in vain, the fourth holds the object
    s.plan.en["spots"] = _en_list([sp[0] for sp in spots[:3]])
    s.plan.ko["spots"] = ", ".join(sp[1] for sp in spots[:2]) + ", 그리고 " + spots[2][1]
    s.plan.en["found_spot"], s.plan.ko["found_spot"] = spots[3]
    s.say(("They looked {spots}.", "둘은 {spots}까지 샅샅이 찾아보았어요."),
          ("Together they searched {spots}.", "둘은 함께 {spots}{spots_eul} 찾아보았어요."))
    s.say(("At last, {B} found the {obj} {found_spot}!", "마침내 {B.i} {found_spot}에서 {obj.eul} 찾았어요!"),
          ("Then {A} saw something {found_spot}. It was the {obj}!", "그때 {A.i} {found_spot}에서 무언가를 보았어요. 바로 {obj.ieosseoyo}!"))
    s.paragraph()
    s.say(("{A} was so happy. \"Thank you, {B}!\" {Ahe} said.", "{A.eun} 정말 기뻤어요. \"고마워, {B.a}!\" 하고 {A.i} 말했어요."),
          ("{A} hugged {B}. \"You are a good friend,\" {Ahe} said.", "{A.eun} {B.eul} 꼭 안아 주었어요. \"너는 정말 좋은 친구야.\""))
    s.say(("From that day on, {A} and {B} were best friends.", "그날부터 {A.gwa} {B.eun} 가장 친한 친구가 되었어요."),
          ("{A} learned that friends always help each other.", "{A.eun} 친구는 언제나 서로 돕는다는 것을 배웠어요."),
          ("After that, {A} always kept the {obj} close.", "그 뒤로 {A.eun} {obj.eul} 늘 가까이에 두었어요."))


def _plot_share(s: Story) -> None:
    p = s.plan
    p.en["food"], food_ko = p.rng.choice(FOODS)
    p.ko["food"] = Ko(food_ko)
    s.say(("{When}, {A}'s mom gave {Ahim} {food}.", "{when}, {A.ui} 엄마가 {food.eul} 주셨어요."),
          ("{When}, {A} found {food} on the kitchen table.", "{when}, {A.eun} 부엌 식탁 위에서 {food.eul} 발견했어요."))
    s.say(("{A} took it to the {place} to eat it all alone.", "{A.eun} 혼자 다 먹으려고 {place}{place_e} 가지고 갔어요."),
          ("{A} wanted to keep it all for {Ahim}self.", "{A.eun} 그것을 혼자 다 먹고 싶었어요."))
    s.paragraph()
    s.say(("There {A} met {Bdesc}.", "거기에서 {A.eun} {Btitle} {B.eul} 만났어요."),
          ("{B} was sitting {at_place}, looking hungry.", "{place}에는 {B.i} 배고픈 얼굴로 앉아 있었어요."))
    s.say(("{B} looked at the food and said, \"That looks so good!\"", "{B.eun} 음식을 보며 말했어요. \"우와, 정말 맛있어 보인다!\""),
          ("\"I am so hungry today,\" said {B} with a sad face.", "\"오늘은 너무 배가 고파.\" 하고 {B.i} 시무룩하게 말했어요."))
    s.say(("At first, {A} did not want to share.", "처음에 {A.eun} 나누어 주고 싶지 않았어요."),
          ("{A} held the food tight. It was {Ahis}!", "{A.eun} 음식을 꼭 쥐었어요. 그건 {A.ui} 것이었으니까요!"))
    s.say(("But then {Ahe} remembered what {Ahis} grandma always said: \"Sharing makes everyone happy.\"",
           "하지만 할머니가 늘 하시던 말씀이 떠올랐어요. \"나누면 모두가 행복해진단다.\""),
          ("But {Ahe} saw how sad {B} looked, and {Ahis} heart felt warm.", "하지만 슬퍼 보이는 {B.eul} 보자 마음이 따뜻해졌어요."))
    s.paragraph()
    s.say(("So {A} gave half to {B}.", "그래서 {A.eun} {B.ege} 반을 나누어 주었어요."),
          ("{A} smiled and shared the food with {B}.", "{A.eun} 웃으며 {B.ege} 음식을 나누어 주었어요."))
    s.say(("They ate together and laughed a lot.", "둘은 함께 먹으며 깔깔 웃었어요."),
          ("\"Thank you, {A}!\" said {B}. \"This is the best day ever!\"", "\"고마워, {A.a}!\" 하고 {B.i} 말했어요. \"오늘은 최고의 날이야!\""))
    s.say(("{A} learned that food tastes better when you share it.", "{A.eun} 함께 나누어 먹으면 더 맛있다는 것을 알게 되었어요."),
          ("Sharing made {A} even happier than eating alone.", "{A.eun} 혼자 먹을 때보다 나누어 먹을 때 더 행복했어요."))


def _plot_brave(s: Story) -> None:
    p = s.plan
    p.en["fear"], fear_ko = p.rng.choice(FEARS)
    p.ko["fear"] = Ko(fear_ko)
    s.say(("But {A} was afraid of {fear}.", "하지만 {A.eun} {fear.i} 무서웠어요."),
          ("{A} had one problem. {AHe} was scared of {fear}.", "그런데 {A.ege}는 고민이 하나 있었어요. {fear.i} 너무 무서웠거든요."))
    s.maybe(0.6, ("Whenever {Ahe} thought about it, {Ahis} legs felt wobbly.", "그 생각만 하면 {A.eun} 다리가 후들후들 떨렸어요."),
            ("{AHe} always hid behind {Ahis} mom.", "{A.eun} 늘 엄마 뒤에 숨곤 했어요."))
    s.paragraph()
    s.say(("{When}, {A} and {Ahis} friend {B} went to the {place}.", "{when}, {A.eun} 친구 {B.gwa} 함께 {place}에 갔어요."),
          ("{When}, {A} went to the {place} with {B}.", "{when}, {A.eun} {B.rang} {place}에 놀러 갔어요."))
    s.say(("There was {fear} right in front of them.", "바로 눈앞에 {fear.i} 있었어요."),
          ("Soon they came to {fear}.", "얼마 지나지 않아 둘은 {fear} 앞에 이르렀어요."))
    s.say(("{A} stopped and said, \"I can't. I am too scared.\"", "{A.eun} 멈춰 서서 말했어요. \"난 못 하겠어. 너무 무서워.\""),
          ("\"I want to go home,\" said {A} in a small voice.", "\"집에 가고 싶어.\" 하고 {A.i} 작은 목소리로 말했어요."))
    s.say(("{B} held {Ahis} hand. \"I am here with you. Let's try together.\"",
           "{B.i} {A.ui} 손을 잡아 주었어요. \"내가 옆에 있을게. 같이 해 보자.\""),
          ("\"Everyone is scared sometimes,\" said {B}. \"You can do it, {A}.\"",
           "\"누구나 가끔은 무서워.\" 하고 {B.i} 말했어요. \"{A.a}, 너는 할 수 있어.\""))
    s.paragraph()
    s.say(("{A} took a deep breath and counted to three.", "{A.eun} 숨을 크게 들이쉬고 셋까지 세었어요."),
          ("{A} closed {Ahis} eyes for a moment and then took one small step.", "{A.eun} 잠깐 눈을 감았다가 작은 한 걸음을 내디뎠어요."))
    s.say(("It was not so scary after all!", "생각보다 무섭지 않았어요!"),
          ("Then another step, and another. It was fun!", "그리고 한 걸음, 또 한 걸음. 재미있었어요!"))
    s.say(("{A} laughed. \"I did it!\" {Ahe} shouted.", "{A.eun} 활짝 웃었어요. \"내가 해냈어!\" 하고 {A.i} 외쳤어요."),
          ("{A} felt proud and brave.", "{A.eun} 스스로가 정말 자랑스러웠어요."))
    s.say(("From then on, {A} was not afraid of {fear} anymore.", "그 뒤로 {A.eun} 더 이상 {fear.i} 무섭지 않았어요."),
          ("{A} learned that being brave means trying even when you are scared.", "{A.eun} 무서워도 해 보는 것이 진짜 용기라는 것을 배웠어요."))


def _plot_new_friend(s: Story) -> None:
    p = s.plan
    p.en["game"], game_ko = p.rng.choice(GAMES)
    p.ko["game"] = Ko(game_ko)
    s.say(("{When}, {A} went to the {place} alone.", "{when}, {A.eun} 혼자 {place}에 갔어요."),
          ("{When}, {A} was playing {at_place}.", "{when}, {A.eun} {place}에서 놀고 있었어요."))
    s.maybe(0.5, ("{scenery}", "{scenery}"))
    s.say(("{AHe} saw {_an_Bkind} sitting alone under a tree.", "{A.eun} 나무 아래에 혼자 앉아 있는 {Bkind.eul} 보았어요."),
          ("Near the swings, there was {_an_Bkind} {A} had never seen before.", "그네 옆에 처음 보는 {Bkind.i} 있었어요."))
    s.say(("\"Hello! What is your name?\" asked {A}.", "\"안녕! 너는 이름이 뭐야?\" 하고 {A.i} 물었어요."),
          ("{A} walked over and said, \"Hi! I am {A}.\"", "{A.eun} 다가가서 말했어요. \"안녕! 나는 {A.iya}.\""))
    s.say(("\"My name is {B}. I am new here,\" said the {Bkind} quietly.",
           "\"내 이름은 {B.iya}. 나는 여기 처음 왔어.\" 하고 {Bkind.i} 작은 목소리로 말했어요."),
          ("\"I am {B},\" said the {Bkind}. \"I just moved here and I don't have any friends yet.\"",
           "\"나는 {B.iya}. 얼마 전에 이사 와서 아직 친구가 없어.\" 하고 {Bkind.i} 말했어요."))
    s.paragraph()
    s.say(("\"Do you want to play {game} with me?\" asked {A}.", "\"나랑 같이 {game} 할래?\" 하고 {A.i} 물었어요."),
          ("{A} had an idea. \"Let's play {game}!\"", "{A.ege} 좋은 생각이 떠올랐어요. \"우리 {game} 하자!\""))
    s.say(("{B} smiled for the first time. \"Yes, please!\"", "{B.eun} 처음으로 환하게 웃었어요. \"좋아!\""),
          ("{B}'s eyes grew bright. \"I love {game}!\"", "{B.ui} 눈이 반짝였어요. \"나 {game} 정말 좋아해!\""))
    s.say(("They played {game} until the sun went down.", "둘은 해가 질 때까지 {game.eul} 했어요."),
          ("They played {game} all afternoon and laughed and laughed.", "둘은 오후 내내 {game.eul} 하며 깔깔 웃었어요."))
    s.paragraph()
    s.say(("When it was time to go home, {B} said, \"Can we play again tomorrow?\"",
           "집에 갈 시간이 되자 {B.i} 말했어요. \"내일 또 같이 놀 수 있어?\""),
          ("\"You are my first friend here,\" said {B}.", "\"너는 여기서 사귄 내 첫 친구야.\" 하고 {B.i} 말했어요."))
    s.say(("\"Of course!\" said {A}. From that day on, they were best friends.",
           "\"물론이지!\" 하고 {A.i} 대답했어요. 그날부터 둘은 단짝 친구가 되었어요."),
          ("{A} felt warm inside. Making a new friend was the best thing of all.",
           "{A.eun} 마음이 따뜻해졌어요. 새 친구를 사귀는 것은 무엇보다 멋진 일이었어요."))


def _plot_help(s: Story) -> None:
    prob_en, prob_ko, fix_en, fix_ko = s.plan.rng.choice(HELP)
    s.plan.en["problem"], s.plan.ko["problem"] = prob_en, prob_ko
    s.say(("{When}, {A} was walking to the {place} with {B}.", "{when}, {A.eun} {B.gwa} 함께 {place}{place_e} 걸어가고 있었어요."),
          ("{When}, {A} and {B} were playing {at_place}.", "{when}, {A.gwa} {B.eun} {place}에서 놀고 있었어요."))
    s.say(("Suddenly they heard a small cry.", "그때 어디선가 작은 울음소리가 들렸어요."),
          ("Then {A} saw something strange.", "그때 {A.i} 이상한 것을 보았어요."))
    s.say(("They saw that {problem}.", "{problem}."), ("Oh no! {problem_cap}.", "저런! {problem}."))
    s.say(("\"We have to help!\" said {A}.", "\"우리가 도와줘야 해!\" 하고 {A.i} 말했어요."),
          ("\"What should we do?\" asked {B}.", "\"어떻게 하지?\" 하고 {B.i} 물었어요."))
    s.paragraph()
    s.say((fix_en, fix_ko))
    s.maybe(0.6, ("{B} helped too, and it was not easy.", "{B.do} 함께 도왔는데, 쉽지 않은 일이었어요."),
            ("It took a long time, but they did not give up.", "시간이 오래 걸렸지만 둘은 포기하지 않았어요."))
    s.say(("\"Thank you so much!\" said a happy voice.", "\"정말 고마워요!\" 하고 기쁜 목소리가 들렸어요."),
          ("Everyone was safe and happy again.", "이제 모두 안전하고 행복해졌어요."))
    s.say(("{A} and {B} felt proud. Helping others made them happy.", "{A.gwa} {B.eun} 뿌듯했어요. 남을 돕는 일은 기분 좋은 일이었어요."),
          ("That night, {A} told {Ahis} mom all about it. \"You were very kind today,\" said Mom.",
           "그날 밤 {A.eun} 엄마에게 모든 이야기를 해 드렸어요. \"오늘 정말 착한 일을 했구나.\" 하고 엄마가 말씀하셨어요."))


def _plot_build(s: Story) -> None:
    p = s.plan
    p.en["proj"], proj_ko = p.rng.choice(PROJECTS)
    p.ko["proj"] = Ko(proj_ko)
    p.en["spoil"], p.ko["spoil"] = p.rng.choice(SPOILERS)
    s.say(("{When}, {A} and {B} decided to make {proj} {at_place}.", "{when}, {A.gwa} {B.eun} {place}에서 {proj.eul} 만들기로 했어요."),
          ("{When}, {A} had a big idea. \"Let's make {proj}!\" {Ahe} told {B}.",
           "{when}, {A.ege} 멋진 생각이 떠올랐어요. \"우리 {proj.eul} 만들자!\" 하고 {A.i} {B.ege} 말했어요."))
    s.say(("They worked hard all morning.", "둘은 아침 내내 열심히 만들었어요."),
          ("{A} did the bottom and {B} did the top.", "{A.eun} 아래쪽을 만들고 {B.eun} 위쪽을 만들었어요."))
    s.say(("Soon it was very tall and very beautiful.", "곧 아주 높고 멋진 작품이 완성되었어요."),
          ("When they finished, they clapped their hands.", "다 만들고 나서 둘은 손뼉을 쳤어요."))
    s.paragraph()
    s.say(("But then {spoil}.", "그런데 그때 {spoil}."), ("Oh no! Suddenly {spoil}.", "이런! 갑자기 {spoil}."))
    s.say(("{A} wanted to cry. \"All our work is gone!\"", "{A.eun} 울고 싶었어요. \"우리가 열심히 만든 게 다 없어졌어!\""),
          ("{B} sat down with a sad face.", "{B.eun} 풀이 죽어 주저앉았어요."))
    s.say(("Then {B} said, \"Let's try again. This time we can make it even better.\"",
           "그때 {B.i} 말했어요. \"다시 해 보자. 이번에는 더 멋지게 만들 수 있을 거야.\""),
          ("{A} wiped {Ahis} tears. \"We can do it again,\" {Ahe} said.", "{A.eun} 눈물을 닦고 말했어요. \"우리 다시 할 수 있어.\""))
    s.paragraph()
    s.say(("So they started again, and this time they were more careful.", "그래서 둘은 다시 시작했고, 이번에는 더 조심스럽게 만들었어요."),
          ("They worked together, and soon it was finished.", "둘은 힘을 모았고, 곧 작품이 다시 완성되었어요."))
    s.say(("The new one was even bigger than before!", "새로 만든 것은 전보다 훨씬 더 컸어요!"),
          ("It was the best one they had ever made.", "지금까지 만든 것 중에서 가장 멋졌어요."))
    s.say(("{A} and {B} learned that you should never give up.", "{A.gwa} {B.eun} 포기하지 않으면 해낼 수 있다는 것을 배웠어요."),
          ("They smiled at each other. Working together was fun.", "둘은 서로 보며 웃었어요. 함께 하니 즐거웠어요."))


def _plot_sorry(s: Story) -> None:
    s.say(("{B} had {a_obj} that {Bhe} loved very much.", "{B.ege}는 아주 아끼는 {obj.i} 있었어요."),
          ("{B} had a new {obj}.", "{B.ege}는 새 {obj.i} 있었어요."))
    s.say(("{When}, {A} asked, \"Can I play with your {obj}?\"", "{when}, {A.i} 물었어요. \"네 {obj.eul} 가지고 놀아도 돼?\""),
          ("{When}, {B} let {A} hold the {obj}.", "{when}, {B.eun} {A.ege} {obj.eul} 빌려주었어요."))
    s.say(("{A} played with it {at_place}, but it fell and broke.", "{A.eun} {place}에서 그것을 가지고 놀다가 그만 떨어뜨려 망가뜨리고 말았어요."),
          ("{A} was not careful, and the {obj} broke.", "{A.eun} 조심하지 않았고, 결국 {obj.i} 망가지고 말았어요."))
    s.paragraph()
    s.say(("{A} felt very bad. {AHe} wanted to hide it.", "{A.eun} 마음이 너무 무거웠어요. 몰래 숨기고 싶었어요."),
          ("{A}'s heart was beating fast. What would {B} say?", "{A.ui} 가슴이 콩닥콩닥 뛰었어요. {B.i} 뭐라고 할까요?"))
    s.say(("But {Ahe} knew that hiding it was not right.", "하지만 숨기는 것은 옳지 않다는 것을 알았어요."),
          ("Then {Ahe} remembered that telling the truth is always best.", "그때 솔직하게 말하는 것이 가장 좋다는 것이 떠올랐어요."))
    s.say(("{A} went to {B} and said, \"I am sorry, {B}. I broke your {obj}.\"",
           "{A.eun} {B.ege} 가서 말했어요. \"{B.a}, 미안해. 내가 네 {obj.eul} 망가뜨렸어.\""),
          ("\"{B}, I have to tell you something,\" said {A}. \"I broke your {obj}. I am really sorry.\"",
           "\"{B.a}, 할 말이 있어.\" 하고 {A.i} 말했어요. \"내가 네 {obj.eul} 망가뜨렸어. 정말 미안해.\""))
    s.paragraph()
    s.say(("{B} was sad for a moment. Then {Bhe} smiled. \"It's okay. Thank you for telling me the truth.\"",
           "{B.eun} 잠시 슬퍼 보였어요. 그러더니 웃으며 말했어요. \"괜찮아. 솔직하게 말해 줘서 고마워.\""),
          ("{B} gave {A} a hug. \"Accidents happen,\" {Bhe} said.", "{B.eun} {A.eul} 안아 주었어요. \"실수는 누구나 할 수 있어.\""))
    s.say(("Together they fixed the {obj} with glue and tape.", "둘은 함께 풀과 테이프로 {obj.eul} 고쳤어요."),
          ("{A}'s dad helped them fix the {obj}, and it looked almost new.", "{A.ui} 아빠가 {obj.eul} 고쳐 주셨는데, 거의 새것처럼 보였어요."))
    s.say(("{A} learned that saying sorry makes things better.", "{A.eun} 진심으로 사과하면 마음이 풀린다는 것을 배웠어요."),
          ("Their friendship was stronger than ever.", "둘의 우정은 전보다 더 단단해졌어요."))


def _plot_discover(s: Story) -> None:
    p = s.plan
    p.en["treasure"], p.ko["treasure"] = p.rng.choice(TREASURES)
    p.en["spot"], p.ko["spot"] = p.rng.choice(SPOTS)
    s.say(("{When}, {A} was exploring the {place}.", "{when}, {A.eun} {place}{place_eul} 탐험하고 있었어요."),
          ("{When}, {A} went for a walk {at_place}.", "{when}, {A.eun} {place}{place_euro} 산책을 나갔어요."))
    s.say(("{AHe} saw something shiny {spot}.", "{A.eun} {spot}에서 반짝이는 무언가를 보았어요."),
          ("{spot_cap}, {Ahe} found an old wooden box.", "{spot}에서 {A.eun} 낡은 나무 상자를 발견했어요."))
    s.say(("\"What is this?\" {A} wondered.", "\"이게 뭘까?\" {A.eun} 궁금했어요."),
          ("{A} was very curious.", "{A.eun} 너무 궁금했어요."))
    s.paragraph()
    s.say(("{AHe} ran to get {Ahis} friend {B}.", "{A.eun} 얼른 친구 {B.ege} 달려갔어요."),
          ("{A} called {B}. \"Come quick! Look what I found!\"", "{A.eun} {B.eul} 불렀어요. \"빨리 와 봐! 내가 뭘 찾았는지 봐!\""))
    s.say(("Together they opened the box slowly.", "둘은 함께 상자를 천천히 열었어요."),
          ("{B} helped {A} open the lid. It was heavy!", "{B.i} 뚜껑 여는 것을 도와주었어요. 뚜껑은 무거웠어요!"))
    s.say(("Inside, there was {treasure}", "안에는 {treasure}{treasure_i} 들어 있었어요."),
          ("They could not believe their eyes. It was {treasure}", "둘은 눈을 의심했어요. 그것은 바로 {treasure}{treasure_ieosseoyo}."))
    s.paragraph()
    s.say(("\"Wow!\" said {B}. \"This is the best surprise!\"", "\"우와!\" 하고 {B.i} 외쳤어요. \"이건 최고의 선물이야!\""),
          ("{A} and {B} jumped up and down with joy.", "{A.gwa} {B.eun} 기뻐서 펄쩍펄쩍 뛰었어요."))
    s.say(("They took it home and showed it to everyone.", "둘은 그것을 집에 가져가서 모두에게 보여 주었어요."),
          ("They decided to keep it as their secret treasure.", "둘은 그것을 둘만의 비밀 보물로 간직하기로 했어요."))
    s.say(("It was the most exciting day of the year.", "올해 들어 가장 신나는 하루였어요."),
          ("{A} learned that there are surprises everywhere if you look closely.", "{A.eun} 자세히 보면 어디에나 놀라운 것이 숨어 있다는 것을 알게 되었어요."))


def _plot_bake(s: Story) -> None:
    p = s.plan
    p.en["bake"], bake_ko = p.rng.choice(BAKES)
    p.ko["bake"] = Ko(bake_ko)
    s.say(("{When}, {A}'s mom was making {bake} in the kitchen.", "{when}, {A.ui} 엄마는 부엌에서 {bake.eul} 굽고 계셨어요."),
          ("{When}, {A} and {Ahis} mom decided to bake {bake}.", "{when}, {A.eun} 엄마와 함께 {bake.eul} 굽기로 했어요."))
    s.say(("\"Can I help?\" asked {A}.", "\"저도 도와드려도 돼요?\" 하고 {A.i} 물었어요."),
          ("{A} wanted to help, so {Ahe} washed {Ahis} hands.", "{A.eun} 돕고 싶어서 손을 깨끗이 씻었어요."))
    s.say(("Mom smiled. \"Of course. You can mix the flour and the eggs.\"", "엄마가 웃으며 말씀하셨어요. \"물론이지. 밀가루랑 달걀을 섞어 주렴.\""),
          ("Mom gave {Ahim} a big bowl and a spoon.", "엄마는 {A.ege} 커다란 그릇과 숟가락을 주셨어요."))
    s.paragraph()
    s.say(("{A} stirred and stirred. Some flour went on {Ahis} nose!", "{A.eun} 열심히 저었어요. 밀가루가 코에 묻었어요!"),
          ("{A} put in sugar, milk and a little butter.", "{A.eun} 설탕과 우유, 그리고 버터를 조금 넣었어요."))
    s.say(("Then they had to wait. Waiting was very hard for {A}.", "그다음에는 기다려야 했어요. {A.ege}는 기다리는 것이 너무 힘들었어요."),
          ("\"Is it ready yet?\" asked {A} again and again.", "\"아직 다 안 됐어요?\" 하고 {A.eun} 몇 번이나 물었어요."))
    s.say(("Mom said, \"Good things take time.\"", "엄마가 말씀하셨어요. \"좋은 것은 시간이 걸린단다.\""),
          ("The kitchen began to smell sweet and warm.", "부엌에 달콤하고 따뜻한 냄새가 퍼지기 시작했어요."))
    s.paragraph()
    s.say(("At last the {bake} came out of the oven.", "드디어 오븐에서 {bake.i} 나왔어요."),
          ("Finally, everything was ready.", "마침내 모든 것이 다 준비되었어요."))
    s.say(("{A} gave some to {Ahis} friend {B}.", "{A.eun} 친구 {B.ege}도 조금 나누어 주었어요."),
          ("{B} came over, and they all ate together.", "{B.do} 놀러 와서 다 함께 먹었어요."))
    s.say(("\"Yum! I love your {bake}!\" said {B}.", "\"세상에서 제일 맛있는 {bake}{bake_ida}!\" 하고 {B.i} 말했어요."),
          ("{A} felt proud because {Ahe} had helped.", "{A.eun} 직접 도왔기 때문에 뿌듯했어요."))


PLOTS = [_plot_lost, _plot_share, _plot_brave, _plot_new_friend, _plot_help, _plot_build, _plot_sorry,
         _plot_discover, _plot_bake]

ENDINGS = [("That night, {A} went to bed with a big smile.", "그날 밤, {A.eun} 환하게 웃으며 잠자리에 들었어요."),
           ("It was a wonderful day.", "정말 멋진 하루였어요."),
           ("The end.", "끝."),
           ("And they lived happily ever after.", "그리고 모두 오래오래 행복하게 살았어요."),
           ("{A} would never forget that day.", "{A.eun} 그날을 절대 잊지 못할 거예요.")]


def _derived(plan: Plan) -> None:
    """Context entries that depend on other entries (particles on plain strings, capitals)."""
    e, k = plan.en, plan.ko
    place = Ko(k["place"])
    k.update(place_e="에", place_eul=place.eul[len(place.base):], place_euro=place.euro[len(place.base):])
    e["_an_Bkind"] = _an(e["Bkind"])
    e["adj_a"] = _an(e["adj"])


def _late(plan: Plan) -> None:
    e, k = plan.en, plan.ko
    if "spots" in k:
        k["spots_eul"] = Ko(k["spots"]).eul[len(k["spots"]):]
    if "problem" in e:
        e["problem_cap"] = e["problem"][0].upper() + e["problem"][1:]
    if "spot" in e:
        e["spot_cap"] = e["spot"][0].upper() + e["spot"][1:]
    if "treasure" in k:
        t = Ko(k["treasure"].rstrip("."))
        k["treasure_i"] = t.i[len(t.base):]
        k["treasure_ieosseoyo"] = t.ieosseoyo[len(t.base):]
        if not e["treasure"].endswith(("\"", ".")):
            e["treasure"] += "."
    if "bake" in k:
        k["bake_ida"] = k["bake"].iya[len(k["bake"].raw):]


class _LazyStory(Story):
    """A Story whose sentences may use context entries that plots set just before (spots, ...)."""

    def say(self, *variants):
        _late(self.plan)
        super().say(*variants)


def _told_story(rng: random.Random) -> tuple[Story, object]:
    """One story plan, told: the Story (plan and parallel paragraphs) and its plot function."""
    plan = Plan(rng)
    _derived(plan)
    s = _LazyStory(plan)
    plot = rng.choice(PLOTS)
    _opening(s)
    if plot is not _plot_brave:
        s.paragraph()
    plot(s)
    s.maybe(0.5, *ENDINGS)
    return s, plot


def make_story(rng: random.Random) -> tuple[str, str]:
    """One story plan rendered as (English, Korean)."""
    s, _ = _told_story(rng)
    return s.render(0), s.render(1)


# --------------------------------------------------------------------------------------------
# instructions: questions about a story, answered from the story (chat records)
#
# The user's first turn quotes the story's beginning (the opening and the start of the plot) and asks one question; further user turns ask more questions about the same
# story. Each question reads one field of the story's plan (the hero, the hero's kind, the friend,
# the place, the time of day, the plot's object or event); it is asked only when the quoted text
# holds the answer's key words (its spans), so every answer is determined by the quote.

INSTRUCT_EN = ["Read the story and answer the question.", "Here is a short story.",
               "Answer the question about this story.", "Please read this story."]
INSTRUCT_KO = ["이야기를 읽고 질문에 답해 주세요.", "짧은 이야기가 있어요.", "이 이야기에 대한 질문에 답해 주세요.",
               "다음 이야기를 읽어 보세요."]
_PLOT_QUESTIONS = {
    # plot: (question EN, answer EN, question KO, answer KO, span keys); spans read from the context
    "_plot_lost": ("What did {A} lose?", "{AHis} {obj}.", "{A.eun} 무엇을 잃어버렸나요?", "{obj.eul} 잃어버렸어요.", ["obj"]),
    "_plot_share": ("What did {A} get?", "{food_cap}.", "{A.eun} 무엇을 받았나요?", "{food.eul} 받았어요.", ["food"]),
    "_plot_brave": ("What was {A} afraid of?", "{fear_cap}.", "{A.eun} 무엇을 무서워했나요?", "{fear.eul} 무서워했어요.",
                    ["fear"]),
    "_plot_new_friend": ("Who did {A} meet?", "{_an_Bkind_cap} named {B}.", "{A.eun} 누구를 만났나요?",
                         "{B.ra} {Bkind.eul} 만났어요.", ["B", "Bkind"]),
    "_plot_help": ("What did {A} and {B} see?", "{problem_cap}.", "{A.gwa} {B.eun} 무엇을 보았나요?", "{problem}.",
                   ["problem"]),
    "_plot_build": ("What did {A} and {B} make?", "{proj_cap}.", "{A.gwa} {B.eun} 무엇을 만들었나요?",
                    "{proj.eul} 만들었어요.", ["proj"]),
    "_plot_sorry": ("What did {A} break?", "{B}'s {obj}.", "{A.eun} 무엇을 망가뜨렸나요?", "{B.ui} {obj.eul} 망가뜨렸어요.",
                    ["B", "obj"]),
    "_plot_discover": ("Where did {A} see something?", "{spot_cap}.", "{A.eun} 어디에서 무언가를 보았나요?",
                       "{spot}에서 보았어요.", ["spot"]),
    "_plot_bake": ("What did {A} and {Ahis} mom bake?", "{bake_cap}.", "{A.eun} 엄마와 무엇을 구웠나요?",
                   "{bake.eul} 구웠어요.", ["bake"]),
}


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _questions(s: Story, plot) -> tuple[list[tuple[str, str, list[str]]], list[tuple[str, str, list[str]]]]:
    """(English, Korean) lists of (question, answer, spans) about the story's plan."""
    e, k = dict(s.plan.en), dict(s.plan.ko)
    for key in ("food", "fear", "proj", "bake"):
        if key in e:
            e[key + "_cap"] = _cap(e[key])
    e["_an_Bkind_cap"] = _cap(e["_an_Bkind"])
    when = e["When"].removeprefix("One ")
    kind_q = ("What kind of animal is {A}?", "{A} is {_an_Akind}.", "{A.eun} 어떤 동물이에요?", "{Akind.ieyo}.")
    if e["Akind"] in ("girl", "boy"):
        kind_q = ("Is {A} a boy or a girl?", "{A} is {_an_Akind}.", "{A.eun} 남자아이예요, 여자아이예요?", "{Akind.ieyo}.")
    e["_an_Akind"] = _an(e["Akind"])
    prep = e["at_place"].split()[0]
    asked = [  # (question EN, answer EN, question KO, answer KO, spans EN, spans KO)
        ("Who is the main character of the story?", "{A}, {adj_a} {Akind}.", "이 이야기의 주인공은 누구예요?",
         "{A.ra} {adj} {Akind.ieyo}.", [e["A"], e["adj"], e["Akind"]], [k["A"].raw, k["adj"], k["Akind"].raw]),
        (*kind_q, [e["A"], e["Akind"]], [k["A"].raw, k["Akind"].raw]),
        ("What is the name of {A}'s friend?", "{B}.", "{A.ui} 친구 이름은 무엇이에요?", "{B.ieyo}.",
         [e["A"], e["B"]], [k["A"].raw, k["B"].raw]),
        ("When does the story take place?", f"On {_an(when)}.", "이 이야기는 언제 일어났나요?", f"{Ko(k['when']).ieosseoyo}.",
         [when], [k["when"]]),
        ("Where does the story take place?", f"{_cap(prep)} the {{place}}.", "이 이야기는 어디에서 일어났나요?", "{place}에서요.",
         [e["place"]], [k["place"]]),
    ]
    q_en, a_en, q_ko, a_ko, keys = _PLOT_QUESTIONS[plot.__name__]
    asked.append((q_en, a_en, q_ko, a_ko, [str(e[x]) for x in keys], [getattr(k[x], "raw", k[x]) for x in keys]))
    en = [(q.format(**e), a.format(**e), sp) for q, a, _, _, sp, _ in asked]
    ko = [(q.format(**k), a.format(**k), sp) for _, _, q, a, _, sp in asked]
    return en, ko


def _passage(s: Story, plot, lang: int) -> str:
    """The story's beginning in language `lang` (0 English, 1 Korean): its first two paragraphs, or
    three for a lost toy (the loss is told in the third)."""
    n = 3 if plot is _plot_lost else 2
    return "\n\n".join(" ".join(x[lang] for x in p) for p in s.paragraphs[:n] if p)


def make_instruction(rng: random.Random, lang: str) -> dict:
    """One chat record about a new story in `lang` ("en" or "ko"): 1-3 questions, each answered.

    Returns {"messages", "lang", "story", "spans"}: `story` is the quoted text and `spans` the key
    words of each answer (all in the story); the shipped files keep "messages" and "lang".
    """
    s, plot = _told_story(rng)
    li = {"en": 0, "ko": 1}[lang]
    story = _passage(s, plot, li)
    answerable = [qa for qa in _questions(s, plot)[li] if all(sp in story for sp in qa[2])]
    chosen = rng.sample(answerable, min(len(answerable), rng.choice([1, 1, 2, 3])))
    lead = rng.choice(INSTRUCT_EN if lang == "en" else INSTRUCT_KO)
    messages = []
    for i, (q, a, _) in enumerate(chosen):
        messages.append({"role": "user", "content": f"{lead}\n\n{story}\n\n{q}" if i == 0 else q})
        messages.append({"role": "assistant", "content": a})
    return {"messages": messages, "lang": lang, "story": story, "spans": [sp for _, _, sp in chosen]}


def generate_instructions(n: int = 200, seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """(English, Korean, held-out evaluation) records: n per language, n // 5 per language held out.

    Each set draws its stories from its own random stream, so the held-out stories are not the
    training ones (a test checks that no quoted story is shared).
    """
    rng_en = random.Random(f"instructions-en-{seed}")
    rng_ko = random.Random(f"instructions-ko-{seed}")
    rng_eval = random.Random(f"instructions-eval-{seed}")
    en = [make_instruction(rng_en, "en") for _ in range(n)]
    ko = [make_instruction(rng_ko, "ko") for _ in range(n)]
    held = [make_instruction(rng_eval, lang) for _ in range(n // 5) for lang in ("en", "ko")]
    return en, ko, held


# --------------------------------------------------------------------------------------------
# letters and diary entries: other words, other structure, dates and plans

MONTHS_EN = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
             "October", "November", "December"]
WEEKDAYS = [("Monday", "월"), ("Tuesday", "화"), ("Wednesday", "수"), ("Thursday", "목"),
            ("Friday", "금"), ("Saturday", "토"), ("Sunday", "일")]
WEATHER = [("sunny", "맑음", "the sky is clear and sunny", "하늘이 맑고 햇살이 좋아요"),
           ("cloudy", "흐림", "it has been cloudy all week", "일주일 내내 날이 흐려요"),
           ("rainy", "비", "it rains almost every day", "거의 매일 비가 와요"),
           ("snowy", "눈", "there is snow on every roof", "지붕마다 눈이 소복이 쌓였어요"),
           ("windy", "바람", "the wind is very strong", "바람이 아주 세게 불어요"),
           ("hot", "더움", "it is so hot that I eat ice cream every day", "너무 더워서 매일 아이스크림을 먹어요"),
           ("chilly", "쌀쌀함", "the mornings are chilly", "아침저녁으로 쌀쌀해요")]
# (EN past, EN base, KO stem phrase for -고 싶다, KO polite past, KO plain past)
ACTIVITIES = [
    ("visited the science museum", "visit the science museum", "과학관에 가", "과학관에 다녀왔어요", "과학관에 다녀왔다"),
    ("rode my bike along the river", "ride my bike along the river", "강변에서 자전거를 타", "강변에서 자전거를 탔어요", "강변에서 자전거를 탔다"),
    ("made kimchi", "make kimchi", "김치를 담그", "김치를 담갔어요", "김치를 담갔다"),
    ("went swimming", "go swimming", "수영하러 가", "수영장에 갔어요", "수영장에 갔다"),
    ("practiced the piano", "practice the piano", "피아노를 연습하", "피아노를 연습했어요", "피아노를 연습했다"),
    ("planted tomatoes and peppers", "plant tomatoes and peppers", "토마토와 고추를 심", "토마토와 고추를 심었어요", "토마토와 고추를 심었다"),
    ("borrowed three books from the library", "borrow more books from the library", "도서관에서 책을 빌리", "도서관에서 책을 세 권 빌렸어요", "도서관에서 책을 세 권 빌렸다"),
    ("baked a chocolate cake", "bake a chocolate cake", "초콜릿 케이크를 굽", "초콜릿 케이크를 구웠어요", "초콜릿 케이크를 구웠다"),
    ("climbed a small mountain", "climb a small mountain", "등산을 하", "작은 산에 올랐어요", "작은 산에 올랐다"),
    ("watched a puppet show", "watch a puppet show", "인형극을 보", "인형극을 봤어요", "인형극을 봤다"),
    ("cleaned my room", "clean my room", "방 청소를 하", "방 청소를 했어요", "방 청소를 했다"),
    ("went to the night market", "go to the night market", "야시장에 가", "야시장에 갔어요", "야시장에 갔다"),
    ("learned a new song in music class", "learn a new song", "새 노래를 배우", "음악 시간에 새 노래를 배웠어요", "음악 시간에 새 노래를 배웠다"),
    ("wrote a poem about the sea", "write a poem", "시를 쓰", "바다에 관한 시를 썼어요", "바다에 관한 시를 썼다"),
]
COMPANIONS = [("mom", "엄마"), ("dad", "아빠"), ("little brother", "남동생"), ("little sister", "여동생"),
              ("grandma", "할머니"), ("grandpa", "할아버지"), ("friends", "친구들"), ("classmates", "반 친구들"),
              ("uncle", "삼촌"), ("cousin", "사촌 동생")]
MEALS = [("noodles", "국수"), ("kimbap", "김밥"), ("pizza", "피자"), ("tteokbokki", "떡볶이"), ("dumplings", "만두"),
         ("fried rice", "볶음밥"), ("pumpkin soup", "호박죽"), ("bibimbap", "비빔밥"), ("sandwiches", "샌드위치"),
         ("pancakes", "팬케이크"), ("curry rice", "카레라이스"), ("cold noodles", "냉면")]
FEELINGS = [("happy", "기뻤다", "기뻤어요"), ("excited", "신났다", "신났어요"), ("a little tired", "조금 피곤했다", "조금 피곤했어요"),
            ("proud", "뿌듯했다", "뿌듯했어요"), ("sleepy", "졸렸다", "졸렸어요"), ("thankful", "고마웠다", "고마웠어요")]
SUBJECTS = [("planets and stars", "행성과 별"), ("insects", "곤충"), ("the history of our town", "우리 마을의 역사"),
            ("fractions", "분수"), ("volcanoes", "화산"), ("healthy food", "건강한 음식"), ("recycling", "재활용"),
            ("the ocean", "바다")]
RECIPIENTS = [("Grandma", "할머니", "할머니께"), ("Grandpa", "할아버지", "할아버지께"), ("Aunt Jenny", "이모", "이모께"),
              ("Uncle Paul", "삼촌", "삼촌께"), ("Ms. Kim", "선생님", "선생님께")]
WRITER_NAMES = [("Hana", "하나"), ("Daniel", "다니엘"), ("Yuna", "윤아"), ("Peter", "성민"), ("Grace", "은지"),
                ("Kevin", "재민"), ("Sophie", "소희"), ("Brian", "민호"), ("Julia", "주희"), ("Henry", "현수")]
CITIES = [("Seoul", "서울"), ("Busan", "부산"), ("Jeju", "제주도"), ("Daejeon", "대전"), ("London", "런던"),
          ("Sydney", "시드니"), ("Toronto", "토론토"), ("Gyeongju", "경주")]


def _pick(rng: random.Random, *options: tuple[str, str]) -> tuple[str, str]:
    return options[rng.randrange(len(options))]


def _letter(rng: random.Random) -> tuple[str, str]:
    r = rng.randrange(len(RECIPIENTS))
    to_en, to_ko, to_ko_dear = RECIPIENTS[r]
    me_en, me_ko = rng.choice(WRITER_NAMES)
    city_en, city_ko = rng.choice(CITIES)
    month = rng.randrange(12)
    day = rng.randint(1, 28)
    _, _, w_en, w_ko = rng.choice(WEATHER)
    wd_en, wd_ko = rng.choice(WEEKDAYS)
    acts = rng.sample(ACTIVITIES, 2)
    comp_en, comp_ko = rng.choice(COMPANIONS)
    meal_en, meal_ko = rng.choice(MEALS)
    subj_en, subj_ko = rng.choice(SUBJECTS)
    feel_en, _, feel_ko = rng.choice(FEELINGS)
    see_month = (month + rng.randint(1, 3)) % 12
    hello = _pick(rng, ("How are you? I hope you are doing well.", "잘 지내고 계시죠?"),
                  ("I miss you very much.", "많이 보고 싶어요."),
                  ("Thank you for the lovely present you sent for my birthday.", "생일 선물 정말 고마워요."))
    school = _pick(rng, ("My teacher says I am doing a good job.", "선생님께서 잘하고 있다고 칭찬해 주셨어요."),
                   ("It is my favorite subject this year.", "올해 제일 좋아하는 과목이에요."),
                   ("It is hard, but I try my best.", "어렵지만 열심히 하고 있어요."))
    bye = _pick(rng, (f"I can't wait to see you in {MONTHS_EN[see_month]}.", f"{see_month + 1}월에 만날 날을 손꼽아 기다리고 있어요."),
                ("Please write back soon.", "답장 꼭 써 주세요."),
                ("Please say hello to everyone for me.", "다른 가족들에게도 안부 전해 주세요."))
    closing = "Your student," if to_ko == "선생님" else rng.choice(["Love,", "With love,", "Hugs,", "See you soon,"])
    comp = Ko(comp_ko)
    en = [f"Dear {to_en},", "",
          f"{hello[0]} Here in {city_en} {w_en}.",
          f"Last {wd_en}, I {acts[0][0]} with my {comp_en}. After that we ate {meal_en} together. "
          f"I was {feel_en} at the end of the day.",
          f"At school we are learning about {subj_en}. {school[0]}",
          f"This weekend I want to {acts[1][1]}. {bye[0]}",
          "", closing, me_en, f"{MONTHS_EN[month]} {day}"]
    ko = [f"사랑하는 {to_ko_dear}", "",
          f"{to_ko}, 안녕하세요? 저 {Ko(me_ko).ieyo}. {hello[1]} 요즘 {Ko(city_ko).eun} {w_ko}.",
          f"지난 {wd_ko}요일에는 {comp.gwa} 함께 {acts[0][3]}. 그다음에 같이 {Ko(meal_ko).eul} 먹었어요. "
          f"하루가 끝날 때쯤에는 정말 {feel_ko}.",
          f"학교에서는 요즘 {subj_ko}에 대해 배우고 있어요. {school[1]}",
          f"이번 주말에는 {acts[1][2]}고 싶어요. {bye[1]}",
          "", f"{month + 1}월 {day}일", f"{me_ko} 올림"]
    return "\n".join(en), "\n".join(ko)


def _diary(rng: random.Random) -> tuple[str, str]:
    month = rng.randrange(12)
    day = rng.randint(1, 28)
    wd_en, wd_ko = rng.choice(WEEKDAYS)
    w_word_en, w_word_ko, _, _ = rng.choice(WEATHER)
    acts = rng.sample(ACTIVITIES, 2)
    comp_en, comp_ko = rng.choice(COMPANIONS)
    meal_en, meal_ko = rng.choice(MEALS)
    feel_en, feel_ko, _ = rng.choice(FEELINGS)
    hours = rng.randint(2, 5)
    reason = _pick(rng, ("we laughed a lot", "많이 웃어서"), ("I tried something new", "새로운 것을 해 봐서"),
                   ("it took a long time", "시간이 오래 걸려서"), ("everyone helped each other", "모두 서로 도와서"))
    taste = _pick(rng, ("It was delicious.", "정말 맛있었다."), ("It was a little too spicy for me.", "나한테는 조금 매웠다."),
                  ("I ate two bowls.", "두 그릇이나 먹었다."))
    plan = _pick(rng, ("I hope the weather is good.", "날씨가 좋았으면 좋겠다."),
                 ("I will go to bed early tonight.", "오늘은 일찍 자야겠다."),
                 ("I need to finish my homework first.", "그 전에 숙제부터 끝내야 한다."))
    comp = Ko(comp_ko)
    en = [f"{wd_en}, {MONTHS_EN[month]} {day}", f"Weather: {w_word_en}", "",
          f"Today I {acts[0][0]} with my {comp_en}. It took about {hours} hours.",
          f"For lunch we had {meal_en}. {taste[0]}",
          f"I felt {feel_en} because {reason[0]}.",
          f"Tomorrow I want to {acts[1][1]}. {plan[0]}"]
    ko = [f"{month + 1}월 {day}일 {wd_ko}요일, 날씨: {w_word_ko}", "",
          f"오늘은 {comp.gwa} 함께 {acts[0][4]}. 한 {hours}시간쯤 걸렸다.",
          f"점심으로 {Ko(meal_ko).eul} 먹었다. {taste[1]}",
          f"{reason[1]} {feel_ko}.",
          f"내일은 {acts[1][2]}고 싶다. {plan[1]}"]
    return "\n".join(en), "\n".join(ko)


def make_letter(rng: random.Random) -> tuple[str, str]:
    """One letter or diary entry rendered as (English, Korean)."""
    return (_letter if rng.random() < 0.5 else _diary)(rng)


# fmt: on
# --------------------------------------------------------------------------------------------
# the corpus


def generate(style: str = "stories", n: int = 900, seed: int = 0):
    """Return (en_docs, ko_docs, mixed_records) for `style`; deterministic per (style, n, seed).

    `n` documents per language file; the mixed file gets n // 4 further documents.
    """
    make = {"stories": make_story, "letters": make_letter}[style]
    rng_en = random.Random(f"{style}-en-{seed}")
    rng_ko = random.Random(f"{style}-ko-{seed}")
    rng_mix = random.Random(f"{style}-mixed-{seed}")
    en_docs = [make(rng_en)[0] for _ in range(n)]
    ko_docs = [make(rng_ko)[1] for _ in range(n)]
    mixed = []
    for _ in range(n // 4):
        en, ko = make(rng_mix)
        lang = rng_mix.choice(["en", "ko", "en+ko"])
        text = {"en": en, "ko": ko, "en+ko": en + "\n\n" + ko}[lang]
        mixed.append({"text": text, "lang": lang})
    return en_docs, ko_docs, mixed


def write_corpus(out: Path, style: str = "stories", n: int = 900, seed: int = 0) -> dict[str, int]:
    """Write the three corpus files under `out`; returns {file name: bytes}."""
    en_docs, ko_docs, mixed = generate(style, n, seed)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        f"{style}_en.txt": "".join(d + f"\n{EOT}\n" for d in en_docs),
        f"{style}_ko.txt": "".join(d + f"\n{EOT}\n" for d in ko_docs),
        f"{style}_mixed.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in mixed),
    }
    return _write_files(out, files)


def _write_files(out: Path, files: dict[str, str]) -> dict[str, int]:
    """Write each {name: text} under `out` (UTF-8, through a temporary name); returns {name: bytes}."""
    sizes = {}
    for name, text in files.items():
        data = text.encode("utf-8")
        tmp = out / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(out / name)
        sizes[name] = len(data)
    return sizes


def write_instructions(out: Path, n: int = 200, seed: int = 0) -> dict[str, int]:
    """Write instructions_en.jsonl, instructions_ko.jsonl and instructions_eval.jsonl under `out`
    (chat records: "messages" and "lang"); returns {file name: bytes}."""
    en, ko, held = generate_instructions(n, seed)
    out.mkdir(parents=True, exist_ok=True)
    return _write_files(
        out,
        {
            name: "".join(
                json.dumps({"messages": r["messages"], "lang": r["lang"]}, ensure_ascii=False) + "\n" for r in records
            )
            for name, records in (
                ("instructions_en.jsonl", en),
                ("instructions_ko.jsonl", ko),
                ("instructions_eval.jsonl", held),
            )
        },
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python tools/make_sample_corpus.py --out data/sample --seed 0",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default data/sample for stories, data/sample-letters for letters)",
    )
    ap.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes")
    ap.add_argument(
        "--stories",
        type=int,
        default=None,
        metavar="N",
        help="documents per language file (the mixed .jsonl gets N/4 more); default 900. "
        "instructions: records per language (N/5 more each held out); default 200",
    )
    ap.add_argument(
        "--style",
        choices=["stories", "letters", "instructions"],
        default="stories",
        help="stories (default), letters, or instructions: chat records of questions about new stories",
    )
    args = ap.parse_args(argv)
    if args.stories is None:
        args.stories = 200 if args.style == "instructions" else 900
    if args.stories < 1:
        ap.error(f"--stories must be >= 1, got {args.stories}")
    default_out = {
        "stories": "data/sample",
        "letters": "data/sample-letters",
        "instructions": "data/sample-instructions",
    }
    out = args.out or Path(default_out[args.style])
    if args.style == "instructions":
        sizes = write_instructions(out, args.stories, args.seed)
    else:
        sizes = write_corpus(out, args.style, args.stories, args.seed)
    for name, size in sizes.items():
        print(f"{out / name}: {size / 1024:.0f} KiB")
    print(f"total {sum(sizes.values()) / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
