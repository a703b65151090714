"""Safety-net lexicon: hard cases in both languages (no model needed)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cds.domain import RiskTier
from cds.nlp import safety_net_scan
from cds.nlp.safety_net import conversation_scan


def tier(text: str, lang: str | None = None) -> RiskTier | None:
    return safety_net_scan(text, lang).tier


@pytest.mark.parametrize("text", [
    "我不想死", "我从来没想过自杀", "我一点都不想自杀", "我不会自杀的，放心",
    "I would never kill myself", "I'm not suicidal", "I don't want to die", "I have no plan to kill myself",
])
def test_negated_intent_is_not_counted(text: str) -> None:
    result = safety_net_scan(text)
    assert result.tier is None
    assert not result.evidence


@pytest.mark.parametrize("text", ["我不想死", "I would never kill myself"])
def test_negation_is_recorded_as_the_reason(text: str) -> None:
    assert [h.status for h in safety_net_scan(text).hits] == ["negation"]


@pytest.mark.parametrize("text", [
    "我朋友说她想死", "我的一个朋友失恋了，要自杀，我要怎么开导他", "她说她想自杀",
    "my friend said she wants to die", "My brother told me he wants to kill himself",
])
def test_third_person_is_not_the_speakers_risk(text: str) -> None:
    assert tier(text) is None


@pytest.mark.parametrize("text", ["“我想死”是一首歌的名字", 'The song is called "I want to die"'])
def test_quotation_is_not_counted(text: str) -> None:
    result = safety_net_scan(text)
    assert result.tier is None
    assert any(h.status == "quotation" for h in result.hits)


def test_speaker_quoting_themself_is_counted() -> None:
    assert tier('I told my mum "I want to die"') == RiskTier.MODERATE


@pytest.mark.parametrize("text", ["你想死吗？", "Do you want to die?", "你有没有想过自杀？"])
def test_question_to_the_other_person_is_not_counted(text: str) -> None:
    assert tier(text) is None


@pytest.mark.parametrize("text", ["吃多少安眠药会死？", "How many pills would it take to kill me?",
                                  "六楼跳下去会死吗"])
def test_lethality_question_is_means_seeking(text: str) -> None:
    assert tier(text) is not None and tier(text) >= RiskTier.HIGH


@pytest.mark.parametrize("text", [
    "笑死我了", "累死了", "热死了", "饿死我了", "想死你了", "今天忙死了，烦死了", "这个游戏的boss太难杀了",
    "this homework is killing me", "I could kill for a pizza", "my feet are killing me", "I'm dying to see it",
    "I was bored to death", "you killed it today",
])
def test_idioms_do_not_fire(text: str) -> None:
    assert safety_net_scan(text).fired is False


@pytest.mark.parametrize("text,expected", [
    ("我想死", RiskTier.MODERATE),
    ("我真的不想活了", RiskTier.MODERATE),
    ("活着好累，不想再醒来", RiskTier.LOW),
    ("I want to kill myself", RiskTier.MODERATE),
    ("I wish I was never born", RiskTier.LOW),
    ("I tried to kill myself last year", RiskTier.HIGH),
    ("我之前自杀过一次，没死成", RiskTier.HIGH),
])
def test_intent_tiers(text: str, expected: RiskTier) -> None:
    assert tier(text) == expected


@pytest.mark.parametrize("text,expected", [  # lexicon zh 1.4.0
    ("三个孩子自己带，老想着死", RiskTier.LOW),
    ("有时觉得死亡真好", RiskTier.LOW),
    ("感情上出了问题，有时候会有死的想法", RiskTier.LOW),
    ("她要是离开我，我宁可就死", RiskTier.LOW),
    ("只有死了他们才会意识到自己的错", RiskTier.LOW),
    ("活着没希望了", RiskTier.LOW),
    ("我感觉没有活下去的动力了", RiskTier.LOW),
    ("我不要活了", RiskTier.MODERATE),
    ("结束咨询后多久自杀对咨询师影响最小？", RiskTier.MODERATE),
    ("如何快速死亡？", RiskTier.HIGH),
    ("每天都会有想死的念头", RiskTier.MODERATE),  # a wider new pattern never swallows a higher one
    ("想直接淹死算了", RiskTier.HIGH),
    ("感觉吊颈会很辛苦", RiskTier.HIGH),
    ("每次站在窗口都好想跳下去", RiskTier.HIGH),
    ("我都会构思自己如何死亡", RiskTier.HIGH),
    ("每天都在想什么方法可以顺理成章的消失", RiskTier.HIGH),
    ("找约死群找了很久", RiskTier.HIGH),
    ("真想离开这个丑恶的世界", RiskTier.MODERATE),
    ("我想在18岁以前走掉", RiskTier.MODERATE),
    ("真害怕我明天就会把自己给了结了", RiskTier.HIGH),  # + timing
    ("过马路在想会不会有车撞死我", RiskTier.HIGH),  # 会不会 asks, it does not negate
    ("但愿你们能好好活下去，我先走一步", RiskTier.IMMINENT),  # the match opens with its own speaker
    ("everyone would be better off without me", RiskTier.LOW),  # opening with someone else: judged as before
    ("太累了 快点死吧", RiskTier.MODERATE),
    ("我无能为力只求一死", RiskTier.MODERATE),  # 无能为力 is no negation
    ("我无时无刻不想死", RiskTier.MODERATE),  # nor is "not a moment without"
    ("可以死掉吗，为什么不能轻轻松松死掉", RiskTier.MODERATE),
    ("我不想再撑下去了", RiskTier.MODERATE),
    ("我怎么还没死", RiskTier.LOW),
    ("真希望来一场飞来横祸", RiskTier.LOW),
    ("无时不刻在想象自己死去的画面", RiskTier.LOW),
    ("经常和家人吵架，之后就想自杀", RiskTier.MODERATE),  # 家人 after 和 is an object, not the subject
    ("被他打了之后我好想死", RiskTier.MODERATE),
])
def test_more_ideation_phrasings(text: str, expected: RiskTier) -> None:
    assert tier(text) == expected


@pytest.mark.parametrize("text", [
    "一想到死亡就害怕", "我总想着死去的奶奶", "我宁死也不会放弃", "宁可饿死也不吃",
    "我们可以把考上大学作为活下去的希望", "我从来没有死的念头",
    "店铺打算下周重开", "他从楼上跳下去了", "我不会跳楼的", "你要不要去死", "我想知道他是不是想自杀",
    "快点死机吧", "你快点死吧", "游戏里可以死一死再复活", "他猝死了好可惜", "我感觉我要淹死了",
    "我的一个朋友失恋了，要自杀", "我真想让他们都去死",  # 他们 after 让 does the dying: the subject stays
])
def test_more_ideation_phrasings_do_not_fire_on_these(text: str) -> None:
    assert tier(text) is None


@pytest.mark.parametrize("text,expected", [  # Traditional script and Cantonese (lexicon zh 1.4.0)
    ("我今晚就跳樓", RiskTier.IMMINENT),
    ("我已經寫好遺書", RiskTier.IMMINENT),
    ("我唔想再生存落去", RiskTier.MODERATE),
    ("做人好攰", RiskTier.LOW),
    ("我琴日又𠝹手", RiskTier.MODERATE),
    ("我想食晒啲安眠藥", RiskTier.HIGH),
    ("我想由天台跳落去", RiskTier.HIGH),
])
def test_traditional_and_cantonese(text: str, expected: RiskTier) -> None:
    assert tier(text) == expected


@pytest.mark.parametrize("text,expected", [  # written Cantonese folded to Mandarin first (zh 1.11.0)
    ("我諗住自殺", RiskTier.MODERATE), ("死咗就唔使咁辛苦", RiskTier.LOW), ("我想食藥死", RiskTier.HIGH),
    ("我想鎅手", RiskTier.MODERATE), ("我儲咗好多安眠藥", RiskTier.IMMINENT), ("我食咗成樽安眠藥", RiskTier.HIGH),
    ("我今晚會跳落去", RiskTier.IMMINENT), ("聽日我就會離開呢個世界", RiskTier.HIGH),
    ("我想揾個地方靜靜地死", RiskTier.MODERATE), ("我好攰，唔想再撐", RiskTier.LOW),
    ("我唔會自殺", None), ("我冇諗過自殺", None), ("佢話想死", None), ("笑死我", None), ("攰到死", None),
])
def test_written_cantonese(text: str, expected: RiskTier | None) -> None:
    assert tier(text) == expected, safety_net_scan(text).hits


@pytest.mark.parametrize("text", ["我想打死佢", "我想斬死佢"])
def test_cantonese_threats_set_harm_to_others(text: str) -> None:
    assert safety_net_scan(text).harm_to_others


@pytest.mark.parametrize("text,expected", [  # "can no longer" states what was happening; "cannot" alone still denies
    ("穿短袖的季节，还要上班，就不能割手了", RiskTier.MODERATE), ("我不能再自残了", RiskTier.MODERATE),
    ("我不能死，我还有孩子", None), ("我不想死", None), ("明天就跳下去游泳", None), ("我今晚就跳下去", RiskTier.IMMINENT),
])
def test_can_no_longer_is_not_a_denial(text: str, expected: RiskTier | None) -> None:
    assert tier(text) == expected, safety_net_scan(text).hits


@pytest.mark.parametrize("text,expected", [  # lexicon en 1.4.0
    ("i want to kms", RiskTier.MODERATE),
    ("thinking about sewerslide", RiskTier.MODERATE),
    ("I want to go to sleep and never wake up", RiskTier.LOW),
    ("I am done with life", RiskTier.LOW),
    ("life is not worth living", RiskTier.LOW),
    ("i might as well be dead", RiskTier.LOW),
    ("I have been researching ways to die", RiskTier.HIGH),
    ("I am saying my goodbyes", RiskTier.IMMINENT),
    ("I want to end myself", RiskTier.MODERATE),
    ("I dont plan on living more than a decade", RiskTier.MODERATE),
    ("No reason to keep on existing", RiskTier.MODERATE),
    ("I wanna slit my wrists", RiskTier.HIGH),
    ("someone will have to find my body", RiskTier.HIGH),  # the body is the speaker's, whoever finds it
    ("I bought sodium nitrite", RiskTier.IMMINENT),
    ("sending a final goodbye message to her", RiskTier.IMMINENT),
])
def test_more_english_phrasings(text: str, expected: RiskTier) -> None:
    assert tier(text, "en") == expected


@pytest.mark.parametrize("text", ["I ran 5 kms today", "life is worth living", "I would never kms",
                                  "my friend is done with life", "my friend wants to end herself",
                                  "I bought an SN card", "that will end me up in trouble"])
def test_more_english_phrasings_do_not_fire_on_these(text: str) -> None:
    assert tier(text, "en") is None


@pytest.mark.parametrize("text", ["我唔想死", "我冇想過自殺", "佢話佢想死", "我有食藥", "唔該晒"])
def test_cantonese_negation_third_person_and_everyday_words(text: str) -> None:
    assert tier(text) is None


@pytest.mark.parametrize("text,expected", [  # lexicon zh 1.5.0: words that hold a negation character but negate nothing
    ("我忍不住想死", RiskTier.MODERATE), ("我控制不住想自杀", RiskTier.MODERATE), ("受不了了想死", RiskTier.MODERATE),
    ("我今天特别想死", RiskTier.MODERATE),  # zh 1.22.0: 今天 says when the wish is felt, not when the act is (was HIGH)
    ("每天没事就想去死", RiskTier.MODERATE), ("这样还不如去死", RiskTier.MODERATE),
    ("已经有过无数次自杀的念头了", RiskTier.MODERATE), ("活着不开心想死", RiskTier.MODERATE),
    ("我怎么还不死啊 好想死", RiskTier.MODERATE),  # a space ends the scope of 不 as a comma does
    ("有没有烧炭的呀", RiskTier.HIGH),  # 有没有 asks; it does not negate
    ("情绪糟糕的时候不停想自杀", RiskTier.MODERATE), ("我一直戒不掉自残", RiskTier.MODERATE),  # zh 1.5.1
])
def test_false_negation_cues_do_not_hide_intent(text: str, expected: RiskTier) -> None:
    assert tier(text, "zh") == expected


@pytest.mark.parametrize("text", [
    "真他妈的想死",  # an expletive, not a third person
    "看了你们的评论 越来越想割腕",  # 你们 owns the comments (possessive)
    "我想去找你，离开这个世界",  # 你 is the object of 找
    "活的很绝望啊，想带着儿子一起去死",  # 儿子 is the object of 带着
    "快让我死吧",  # a wish, not someone telling me to die
    "我是一名初三的女孩，最近经历了语言暴力，想自杀",  # the speaker describing herself (zh 1.5.1)
    "与好朋友分开而想死",  # 好朋友 after the preposition 与 (zh 1.5.1)
    "有时想到自杀", "我迟早会抑郁自杀",  # zh 1.5.1
])
def test_objects_possessors_and_expletives_are_not_the_subject(text: str) -> None:
    result = safety_net_scan(text, "zh")
    assert result.tier is not None and result.tier >= RiskTier.MODERATE, result.hits


@pytest.mark.parametrize("text", ["有没有人一起去死", "组团去死的有吗", "有没有一起烧炭的", "约好一起跳河"])
def test_suicide_pact_is_a_plan(text: str) -> None:
    result = safety_net_scan(text, "zh")
    assert result.tier is not None and result.tier >= RiskTier.HIGH
    assert "plan" in result.kinds


@pytest.mark.parametrize("text", ["哪里买那么多安眠药呀", "要买哪种炭啊", "有人知道烧炭的步骤吗"])
def test_seeking_means_is_at_least_high(text: str) -> None:
    result = safety_net_scan(text, "zh")
    assert result.tier is not None and result.tier >= RiskTier.HIGH


@pytest.mark.parametrize("text", ["他让我去死", "我不想死", "我从来没想过自杀", "我朋友说她想死", "你的朋友想自杀吗",
                                  "要死一起死，怕什么", "我们一起去吃饭吧", "人迟早会死",
                                  "我是他朋友，他想自杀"])
def test_the_1_5_0_changes_leave_these_uncounted(text: str) -> None:
    result = safety_net_scan(text, "zh")
    assert result.tier is None, result.hits
    assert "plan" not in result.kinds


@pytest.mark.parametrize("text", [
    "我打算跳楼", "我计划下周自杀", "我想好了怎么死", "我想割腕", "我想死，已经查好了楼层",
    "I'm planning to kill myself", "I'm going to jump off the bridge", "I want to hang myself",
    "I want to die. I have a plan",
])
def test_explicit_plan_or_means_is_at_least_high(text: str) -> None:
    t = tier(text)
    assert t is not None and t >= RiskTier.HIGH, safety_net_scan(text).hits


@pytest.mark.parametrize("text", [
    "我今晚就去跳楼", "我攒了很多安眠药", "我写好了遗书", "永别了，这个世界", "我想死，东西都送人了",
    "I'm going to take all my pills tonight", "I've been saving up my pills", "I wrote a suicide note",
    "I want to die. I said goodbye to my family", "Goodbye everyone, this is my last message",
])
def test_means_and_timing_or_preparation_is_imminent(text: str) -> None:
    assert tier(text) == RiskTier.IMMINENT, safety_net_scan(text).hits


def test_timing_alone_is_not_risk() -> None:
    assert tier("我今晚要去看电影") is None
    assert tier("I'm going to the gym tonight") is None
    assert tier("I bought a rope for camping") is None


@pytest.mark.parametrize("text", ["我想杀了他", "我想把人类全杀了", "I want to kill him", "I'm going to shoot up the school"])
def test_aggression_sets_harm_to_others_without_a_tier(text: str) -> None:
    result = safety_net_scan(text)
    assert result.harm_to_others
    assert result.tier is None


@pytest.mark.parametrize("text", [
    "我脑子里总有杀他的念头", "我真想让他们都去死", "我带了一把刀去找他", "我巴不得我的室友快点去死",
    "I have homicidal thoughts", "I'm going to hurt him", "I want him dead", "I keep having urges to hurt people",
])
def test_threats_and_urges_towards_others_set_harm_to_others(text: str) -> None:
    result = safety_net_scan(text)
    assert result.harm_to_others
    assert result.tier is None


@pytest.mark.parametrize("text", [
    # lexicons 1.4.0: named targets, conditional threats, violent urges, insults aimed at "you"
    "我想杀了我爸", "我想弄死那个人", "我想揍他一顿", "他再惹我我就捅了他", "我有暴力倾向", "我控制不住想打人",
    "你这个死人，快点", "你们滚吧！", "I feel like hurting someone", "I keep having violent thoughts about my boss",
    # a negation before a new subject does not reach it (the cue negates 爽, not 死)
    "以后过得不爽了你们都得死",
    # "why can't ... " is a rhetorical question, not a negation
    "为什么不可以让他们死",
])
def test_more_threats_towards_others_set_harm_to_others(text: str) -> None:
    result = safety_net_scan(text)
    assert result.harm_to_others
    assert result.tier is None


@pytest.mark.parametrize("text,expected", [  # zh 1.7.0: SOS-4K train+validation texts both model and net missed
    ("一年我都不想熬", RiskTier.MODERATE), ("我恐怕撑不过六月了", RiskTier.MODERATE), ("活着最大的盼头就是死亡", RiskTier.MODERATE),
    ("想替他们死去", RiskTier.MODERATE), ("现在可以去死了", RiskTier.MODERATE), ("希望明天就死", RiskTier.HIGH),
    ("我又冒出了自杀的冷静决定", RiskTier.HIGH),
    ("前几天自杀又被警察叔叔救了", RiskTier.HIGH), ("昨晚吃了30颗药", RiskTier.HIGH), ("我刚刚割脉了", RiskTier.MODERATE),
    ("写的遗书被老爸看到了", RiskTier.IMMINENT), ("干脆让我去天堂好了", RiskTier.LOW),
    ("怎么不打扰别人然后离开这个讨厌的世界", RiskTier.MODERATE),  # 别人 is the object of 打扰
])
def test_more_euphemisms_plans_and_attempts(text: str, expected: RiskTier) -> None:
    assert tier(text, "zh") == expected


@pytest.mark.parametrize("text", ["我不想熬夜", "我不想熬汤", "我吃了两片药就睡了", "打算重开一局游戏", "我想去天堂岛旅游"])
def test_more_euphemisms_leave_these_alone(text: str) -> None:
    assert tier(text, "zh") is None


@pytest.mark.parametrize("text", [  # lexicons 1.6.0: beating, revenge, arson, poison, a vehicle, a child at risk
    "我想打他", "我真想揍死他", "我忍不住想打孩子", "我打了我老婆", "我控制不住会动手打人", "我想把他打残",
    "我想拿刀砍我爸", "我想杀了全班同学", "有时候我想掐死我的宝宝", "我怕我会伤害我的孩子", "我要让他付出代价",
    "我想放火烧了他家", "我想在他饭里下毒", "我想开车撞死他们",
    "I hit my wife", "I punched my girlfriend", "I want to make him suffer", "I'll burn his house down",
])
def test_harm_to_others_1_6_0(text: str) -> None:
    result = safety_net_scan(text)
    assert result.harm_to_others, result.hits
    assert result.tier is None


@pytest.mark.parametrize("text", [  # en 1.7.0 / zh 1.8.0: any person as the object (one shared list), more verbs
    "I want to hurt the guy who bullied me", "I'm going to beat the crap out of him", "Sometimes I imagine killing my parents",
    "I want everyone at work dead", "I'm going to run him over with my car", "I want to hit my kids when they cry",
    "I'm gonna beat that bastard to death", "I'm planning to stab my stepdad", "I keep picturing shooting those people",
    "我要去学校报复那些欺负我的人", "我一定要报复他们",
])
def test_harm_to_others_towards_any_person(text: str) -> None:
    result = safety_net_scan(text)
    assert result.harm_to_others, result.hits
    assert result.tier is None


@pytest.mark.parametrize("text", [
    "I'm going to hurt my back if I lift that", "I'm going to beat him at chess", "I'm about to beat the final boss",
    "I'll shoot him a text tonight", "I want to hit him up later for coffee", "I'm going to kick them out of the apartment",
    "I don't want to hurt her feelings", "I'm going to hit the gym", "I picture hugging my kids", "我不想报复他们",
    "我怕他们报复我", "老师会报复他吗",
])
def test_look_alikes_of_harm_towards_any_person_are_not_harm(text: str) -> None:
    assert not safety_net_scan(text).harm_to_others, [h for h in safety_net_scan(text).hits if h.counted]


@pytest.mark.parametrize("text", ["我想打他电话", "我想打游戏", "我打了他的电话", "我不想打他", "I hit the wall",
                                  "I beat my record", "make them pay attention", "all I do is make her suffer"])
def test_everyday_hitting_and_paying_are_not_harm(text: str) -> None:
    assert not safety_net_scan(text).harm_to_others


@pytest.mark.parametrize("text", [
    "我想我今晚就要死了", "希望我能死掉", "I want to kill my self", "I want to kill that part of me",
    "I could kill for a pizza", "我才不会让他们死", "she said she wants him dead",
    "我不想伤害别人", "我从来没想过打人", "你不是废物", "I would never hurt anyone", "I never think about hurting people",
    "为什么不想死的人一下子就死了", "他有暴力倾向", "my husband has violent urges",
])
def test_own_risk_idioms_and_negation_do_not_set_harm_to_others(text: str) -> None:
    assert not safety_net_scan(text).harm_to_others


@pytest.mark.parametrize("text", [  # zh 1.13.0: wishing another dead, attacking someone, a blade on things
    "觉着她死了拉倒", "他死了才好", "他们死了最好", "他怎么还不去死", "我有时会攻击她", "比如说攻击她",
    "总是会拿刀拿斧去砍东西发泄", "我想把他们全杀了", "我想把我的继父杀了", "你这个大傻逼",
])
def test_harm_to_others_1_13_0(text: str) -> None:
    result = safety_net_scan(text)
    assert result.harm_to_others, result.hits
    assert result.tier is None


@pytest.mark.parametrize("text", [  # the same words with the speaker as the victim, or no one as the target
    "六岁的时候妈妈说我多说一句话就要把我砍死", "他们想把我们都杀了", "一言不发太傻逼了", "我奶奶去年死了", "她说她死了算了",
    "我被攻击了", "他攻击她的观点", "我不会攻击别人", "切菜时拿刀砍到了手",
])
def test_look_alikes_of_harm_1_13_0_are_not_harm(text: str) -> None:
    assert not safety_net_scan(text).harm_to_others, [h for h in safety_net_scan(text).hits if h.counted]


@pytest.mark.parametrize("text", ["我已经攒了一个月的药，这周末就吃", "我攒了半年的安眠药", "我囤了3个月的药"])
def test_pills_saved_up_over_a_time_are_a_preparatory_act(text: str) -> None:
    """The issue's own example in Chinese: a duration between 攒了 and 药 still names a stockpile (imminent)."""
    assert safety_net_scan(text).tier == RiskTier.IMMINENT


@pytest.mark.parametrize("text", ["医生给我开了一个月的药", "我存了一个月的药", "我不会再攒了一个月的药"])
def test_a_months_prescription_is_not_a_stockpile(text: str) -> None:
    assert safety_net_scan(text).tier is None


@pytest.mark.parametrize("text", [  # en 1.11.0: a weekday is a time; "going to overdose" names the method
    "I plan to hang myself on Friday", "I'm going to overdose next Monday", "I'll overdose tonight",
])
def test_method_with_a_weekday_or_an_overdose_intent_is_imminent(text: str) -> None:
    assert safety_net_scan(text).tier == RiskTier.IMMINENT


@pytest.mark.parametrize("text", ["I'm seeing my therapist on Friday", "see you next monday", "I would never overdose",
                                  "will overdose be covered in the lecture?", "my friend is going to overdose, I'm worried",
                                  "I'm gonna overdose on chocolate this weekend"])
def test_weekdays_and_overdose_look_alikes_are_not_risk(text: str) -> None:
    assert safety_net_scan(text).tier is None


@pytest.mark.parametrize("conversation", [  # en 1.12.0 / zh 1.14.0: a plan without its object, after ideation
    ["I want to die", "I know exactly how I'm going to do it"], ["我不想活了", "我已经想好怎么做了"],
    ["I want to end it all", "I've decided. Sunday night."], ["我想死", "日子我已经定好了"],
])
def test_a_plan_that_leans_on_earlier_ideation_is_high(conversation: list[str]) -> None:
    assert conversation_scan(conversation).tier == RiskTier.HIGH


@pytest.mark.parametrize("text", ["我想好怎么做了，明天去跟老板谈", "I know exactly how to do it, the recipe is easy",
                                  "日子定好了，下个月结婚", "see you sunday night!"])
def test_a_plan_or_a_day_with_no_risk_nearby_is_nothing(text: str) -> None:
    assert safety_net_scan(text).tier is None


def test_cut_myself_with_an_injury_word_is_self_harm() -> None:
    """割伤自己 is 割自己 with the result of the cut (as 划伤自己); 割伤了手指 by accident is not self-harm."""
    assert safety_net_scan("比如说写诗 比如说割伤自己").tier == RiskTier.MODERATE
    assert safety_net_scan("我不小心割伤了手指").tier is None


@pytest.mark.parametrize("text", ["他又打我了", "我被同学欺负", "爸爸让我去死", "I was raped", "my dad hits me"])
def test_victimisation_flag(text: str) -> None:
    result = safety_net_scan(text)
    assert result.victimisation
    assert result.tier is None


@pytest.mark.parametrize("text", [
    "今天好累 I want to kill myself", "I'm so tired, 我真的不想活了", "我今晚 want to end it all",
])
def test_mixed_language_messages(text: str) -> None:
    t = tier(text)
    assert t is not None and t >= RiskTier.MODERATE


def test_mixed_language_context_crosses_lexicons() -> None:
    # zh timing word anchored by an English statement of intent
    # ("I will take all my pills" alone is also adherence since en 1.19.0: "at once" makes it a method)
    assert tier("今晚 I will take all my pills at once") == RiskTier.IMMINENT


@pytest.mark.parametrize("text", ["😢😢 我想死 💊", "I want to kill myself 😭🔪", "🙂👍", "😂 笑死我了 😂"])
def test_emoji_keeps_offsets_and_does_not_fire_alone(text: str) -> None:
    result = safety_net_scan(text)
    for e in result.evidence:
        assert text[e.start:e.end] == e.text
    if "🙂" in text or "笑死" in text:
        assert result.fired is False
    else:
        assert result.tier is not None


def test_empty_text() -> None:
    result = safety_net_scan("")
    assert result.tier is None and result.evidence == () and not result.harm_to_others


def test_100kb_text_is_scanned_to_the_end() -> None:
    filler = "今天天气不错，我们去散步吧。" * 3000 + "The weather is fine today. " * 2000
    text = filler + "我写好了遗书"
    assert len(text.encode("utf-8")) > 100_000
    result = safety_net_scan(text)
    assert result.tier == RiskTier.IMMINENT
    [ev] = [e for e in result.evidence if e.kind == "preparatory_act"]
    assert text[ev.start:ev.end] == ev.text and ev.start > 90_000


@pytest.mark.parametrize("text", [
    "我真的不想活了，我攒了很多安眠药", "Ｉ ＷＡＮＴ to die", "I can’t go on, I’ve saved up my pills",
    "Ich bin müde. I want to kill myself tonight", "我今晚就去跳楼",
])
def test_evidence_offsets_slice_the_original_text(text: str) -> None:
    result = safety_net_scan(text)
    assert result.evidence
    for e in result.evidence:
        assert 0 <= e.start < e.end <= len(text)
        assert text[e.start:e.end] == e.text
        assert e.source.startswith("lexicon:")


def test_curly_apostrophe_and_fullwidth_letters_match() -> None:
    assert tier("I don’t want to live anymore") == RiskTier.MODERATE
    assert tier("ＫＩＬＬ ＭＹＳＥＬＦ") == RiskTier.MODERATE


@pytest.mark.parametrize("text", [
    "I have saved up the pills, I will take them all this weekend",
    "I have saved the pills, this weekend",
    "我已经攒够了安眠药，打算这周末全部吃掉",
    "药我已经攒够了，就这周末",
])
def test_the_3am_message_is_imminent_whatever_the_model_says(text: str) -> None:
    """The project's founding example: stockpiled means plus a date is a preparatory act (imminent)."""
    result = safety_net_scan(text)
    assert result.tier == RiskTier.IMMINENT
    assert "preparatory_act" in result.kinds or {"means", "timing"} <= set(result.kinds)


# -- a conversation scanned message by message is the conversation scanned whole ----------------------
_FRAGMENTS = ["我想死", "我不想死", "我朋友说她想自杀", "笑死我了", "“我想死”这首歌", "我已经攒够了安眠药", "今晚", "这周末",
              "计划", "跳楼", "再见了", "他们都得死", "I want to die", "I would never kill myself",
              "my friend said she wants to die", "this homework is killing me", "I have saved up the pills", "tonight",
              "goodbye everyone", "but", "I'll kill him", "pills", "，", "。", "!", " ", "\n", '"', "不", "吃多少片",
              "会死吗", "😂", "ＩＭ", "don’t", "去死"]


@settings(max_examples=300, deadline=None)
@given(messages=st.lists(st.lists(st.sampled_from(_FRAGMENTS), max_size=6).map("".join), min_size=1, max_size=6),
       lang=st.sampled_from([None, "zh", "en"]))
def test_conversation_scan_equals_scanning_the_joined_text(messages: list[str], lang: str | None) -> None:
    from cds.nlp.safety_net import (LEXICON_DIR, _apply_context, _dedupe, _languages, _scan_lexicon,
                                    conversation_hits, lexicons)
    from cds.nlp.text import normalise

    joint = "\n".join(messages)
    lex = lexicons(LEXICON_DIR)
    norm = normalise(joint)
    whole = [h for code in _languages(joint, lang) for h in _scan_lexicon(lex[code], norm)] if joint else []
    assert conversation_hits(messages, lang) == (_dedupe(_apply_context(whole, lex)) if joint else [])


def test_context_crosses_messages_in_a_conversation() -> None:
    from cds.nlp.safety_net import conversation_hits

    # "tonight" alone is not risk; after "I have saved up the pills" in the message before, it is timing
    alone = [h for h in conversation_hits(["tonight is the night"], "en") if h.counted]
    together = [h for h in conversation_hits(["I have saved up the pills", "tonight is the night"], "en") if h.counted]
    assert not alone
    assert {h.kind for h in together} >= {"timing"}


@pytest.mark.parametrize("text,expected", [  # zh 1.8.0 / en 1.7.0: only fear holds the speaker back, so the wish stands
    ("又没有勇气去死", RiskTier.MODERATE), ("我没勇气去死", RiskTier.MODERATE), ("不敢跳楼，不然早结束了", RiskTier.HIGH),
    ("I don't have the guts to kill myself", RiskTier.MODERATE), ("I'm not brave enough to kill myself", RiskTier.MODERATE),
    ("I don't have the courage to end my life", RiskTier.MODERATE),
])
def test_fear_is_not_a_negation(text: str, expected: RiskTier) -> None:
    assert tier(text) == expected, safety_net_scan(text).hits


@pytest.mark.parametrize("text", ["我不想死", "我没有想自杀", "我从来没想过自杀", "I would never kill myself",
                                  "I don't want to die", "I do not want to kill myself"])
def test_negation_still_holds_next_to_the_fear_exceptions(text: str) -> None:
    assert tier(text) is None, safety_net_scan(text).hits


@pytest.mark.parametrize("text", [  # the person after 受不了/恨/讨厌, a cause (因/由于) or 没有 is not the subject
    "受不了父母，有种想死的冲动", "现在越来越恨自己的父母，抑郁症到想自杀", "因父母干涉走上了不喜欢的职业，对未来失去希望想自杀",
    "没有家人，没有朋友，再见世界",
])
def test_people_the_speaker_suffers_lacks_or_blames_are_not_the_subject(text: str) -> None:
    assert tier(text) is not None, safety_net_scan(text).hits


@pytest.mark.parametrize("text,expected", [  # a clause without a subject: whose sentence is it?
    ("14岁，心事也从不敢对别人说，刚差点跳楼了怎么办", RiskTier.HIGH),  # the speaker's own narrative, pronoun dropped
    ("我的一个朋友失恋了，要自杀", None),  # the sentence is about the friend
    ("所以最后，他们身心俱疲，选择离开这个世界", None),  # the clause before opens with them: a topic chain
    ("昨天很累，朋友失恋了，要自杀", None),
])
def test_the_subject_of_a_clause_without_one(text: str, expected: RiskTier | None) -> None:
    assert tier(text) == expected, safety_net_scan(text).hits


@pytest.mark.parametrize("text,expected", [  # en 1.8.0 / zh 1.9.0: C-SSRS behaviour items and burdensomeness
    ("I attempted suicide when I was 16", RiskTier.HIGH), ("I stood on the edge of the roof last night", RiskTier.HIGH),
    ("I've been researching how many pills it takes", RiskTier.HIGH), ("I looked up how to overdose", RiskTier.HIGH),
    ("I keep thinking about driving my car into a wall", RiskTier.HIGH), ("I started cutting again", RiskTier.MODERATE),
    ("I'm a burden to everyone", RiskTier.LOW), ("I overdosed on my sleeping pills", RiskTier.HIGH),
    ("我是家里的累赘", RiskTier.LOW), ("没有我大家会过得更好", RiskTier.LOW), ("我想一觉睡过去再也不醒来", RiskTier.LOW),
    ("我在网上搜怎么自杀", RiskTier.HIGH), ("我昨晚站在楼顶边上", RiskTier.HIGH), ("我把绳子套在脖子上过", RiskTier.HIGH),
    ("我吃了一整瓶安眠药", RiskTier.HIGH), ("我想开车撞墙", RiskTier.HIGH), ("我写好了遗言", RiskTier.IMMINENT),
    ("我不想活了，给大家写了告别信", RiskTier.IMMINENT),
])
def test_behaviour_items_and_burdensomeness(text: str, expected: RiskTier) -> None:
    assert tier(text) == expected, safety_net_scan(text).hits


@pytest.mark.parametrize("text", [
    "I started cutting back on sugar", "I have been cutting class", "I use it on myself every morning",
    "he attempted suicide last year", "I never attempted suicide", "I stood on the edge of the pool",
    "我不是大家的负担", "我吃了很多药，胃很难受", "我查了怎么做红烧肉", "他站在楼顶边上", "我开车去上班",
    "我给同事写了告别信，下个月离职", "I started cutting my own hair", "I keep cutting myself off from friends",
    "we looked up how to overdose-proof the medicine cabinet", "my grandma wrote a goodbye letter before she moved",
    "I overdosed on chocolate", "I od'd on netflix this weekend",
])
def test_look_alikes_of_behaviour_items(text: str) -> None:
    assert tier(text) is None, safety_net_scan(text).hits


@pytest.mark.parametrize("text,expected", [  # zh 1.10.0: wishes, relief in death, a method named with 自杀
    ("我觉得死了会比较轻松", RiskTier.LOW), ("我想让自己消失", RiskTier.LOW),
    ("我真的活够了", RiskTier.LOW), ("我恨不得死掉", RiskTier.MODERATE), ("我巴不得自己死了", RiskTier.MODERATE),
    ("我想一个人静静地死去", RiskTier.MODERATE), ("我想吃药自杀", RiskTier.HIGH),
])
def test_wishes_relief_and_a_named_method(text: str, expected: RiskTier) -> None:
    assert tier(text) == expected, safety_net_scan(text).hits


@pytest.mark.parametrize("text", ["我想起死去的奶奶", "他想吃药自杀", "我不觉得死了会轻松", "这个架子撑不住了", "我困得撑不住了",
                                  "他活够了", "我不会吃药自杀的", "我撑不住了，好困，先睡了",
                                  "我真的活够了这种日子，想换工作"])
def test_look_alikes_of_wishes_and_methods(text: str) -> None:
    assert tier(text) is None, safety_net_scan(text).hits


def test_wishing_someone_else_dead_is_harm_not_ideation() -> None:
    result = safety_net_scan("我恨不得他去死")
    assert result.tier is None and result.harm_to_others


@pytest.mark.parametrize("text, expected", [  # en 1.13.0: asking for a method or its lethality names the means
    ("What's the best way to kill yourself?", RiskTier.HIGH),
    ("Will sodium nitrite kill me? Is it painful", RiskTier.HIGH),
    ("is hanging a painless way", RiskTier.HIGH),
    ("how painful is hanging", RiskTier.HIGH),
    ("would 20 tylenol kill me", RiskTier.HIGH),
    ("I have a belt around my neck. I wish I knew how to do it properly", RiskTier.IMMINENT),
    ("I gave my cat to my neighbour because I won't be around", RiskTier.IMMINENT),
    ("I've been thinking about ending things", RiskTier.MODERATE),
    ("I don't see the point of going on anymore", RiskTier.LOW),
    # en 1.14.0
    ("I honestly think they'd be better off if I just wasn't around anymore.", RiskTier.LOW),
    ("everyone would be happier if I were dead and gone", RiskTier.LOW),
    ("Every night I think about how easy it would be to just not wake up", RiskTier.LOW),
    # en 1.15.0
    ("I feel like a burden to everyone", RiskTier.LOW), ("I have nothing left to live for", RiskTier.LOW),
    ("I just want it all to stop forever", RiskTier.MODERATE),
])
def test_method_seeking_and_veiled_statements_en_1_13_to_1_15(text: str, expected: RiskTier) -> None:
    assert safety_net_scan(text, "en").tier == expected


@pytest.mark.parametrize("text", [  # their look-alikes
    "will my mom kill me if I fail", "will this coffee kill me lol", "how do you kill yourself in minecraft",
    "I'm thinking about ending things with my girlfriend", "I don't see the point of this meeting",
    "I gave my old guitar to my brother, I won't need it at college",
    "I gave my dog to my sister since I won't be around next week",
    "I would never look up the best way to kill myself",
    "it's better if I wasn't here for the meeting", "my friend thinks they'd be better off if he wasn't around",
    "I try to not wake up early on weekends", "my mom has nothing to live for since dad died",
    "I don't feel like a burden anymore",
])
def test_look_alikes_of_method_seeking_1_13_0_are_not_risk(text: str) -> None:
    assert safety_net_scan(text, "en").tier is None


@pytest.mark.parametrize("text", ["有时候觉得活着没什么意思", "活着真没啥意思", "我觉得活着也没什么意思了"])
def test_life_has_no_meaning_with_a_filler_word_is_passive_ideation_1_15_0(text: str) -> None:
    assert safety_net_scan(text, "zh").tier == RiskTier.LOW


@pytest.mark.parametrize("text", ["这部电影没什么意思", "不要觉得活着没什么意思"])
def test_no_meaning_about_a_film_or_negated_is_not_ideation(text: str) -> None:
    assert safety_net_scan(text, "zh").tier is None


@pytest.mark.parametrize("conversation", [  # zh / en 1.16.0: a time word times an intent, not a passive wish
    ["有时候觉得活着没什么意思", "今天考试压力好大，不过还好"], ["活着没意思", "明天还要上班"],
    ["I wish I could disappear", "work was long today, I'm tired but ok"], ["I'm tired of living", "see you tomorrow!"],
])
def test_a_time_word_beside_a_passive_wish_is_not_timing(conversation: list[str]) -> None:
    assert conversation_scan(conversation).tier == RiskTier.LOW


@pytest.mark.parametrize("conversation", [["我想死", "今晚就去"], ["I want to die", "tonight"]])
def test_a_time_word_beside_intent_still_is(conversation: list[str]) -> None:
    assert conversation_scan(conversation).tier == RiskTier.HIGH


@pytest.mark.parametrize("text,lang", [  # zh / en 1.17.0: murder-suicide: the person killed is the object
    ("先杀了你再自杀", "zh"), ("我想杀了他然后自杀", "zh"), ("我打了他，然后想自杀", "zh"),
    ("I will kill you and then kill myself", "en"),
])
def test_the_person_a_violent_verb_acts_on_is_not_who_dies_next(text: str, lang: str) -> None:
    result = safety_net_scan(text, lang)
    assert result.tier is not None and result.tier >= RiskTier.MODERATE and result.harm_to_others, result.hits


@pytest.mark.parametrize("text,lang", [("他骂了你以后，你想自杀吗", "zh"), ("I hit you and then you said you want to die", "en")])
def test_the_object_rule_still_leaves_the_next_subject_alone(text: str, lang: str) -> None:
    assert safety_net_scan(text, lang).tier is None, safety_net_scan(text, lang).hits


@pytest.mark.parametrize("text", ["如果和家里人都很不愉快，只有自杀一个方法能报复吗？", "我有自杀心"])
def test_kill_inside_suicide_is_not_aggression(text: str) -> None:  # zh 1.17.0: 杀一个 / 杀心 inside 自杀一个 / 自杀心
    assert not safety_net_scan(text, "zh").harm_to_others, safety_net_scan(text, "zh").hits


@pytest.mark.parametrize("text,lang,flag", [  # zh / en 1.17.0: a killing the speaker did
    ("我杀了一个人", "zh", True), ("我杀人了", "zh", True), ("我想杀一个人", "zh", True), ("我没杀人", "zh", False),
    ("我杀了一个小时的怪", "zh", False), ("I killed a man", "en", True), ("I killed someone last year", "en", True),
    ("I killed a spider", "en", False), ("I killed it at the gym", "en", False), ("I shot him a text", "en", False),
])
def test_a_killing_by_the_speaker_flags_harm_to_others(text: str, lang: str, flag: bool) -> None:
    assert safety_net_scan(text, lang).harm_to_others is flag, safety_net_scan(text, lang).hits


# Hand-written Chinese counselling-chat turns (not from any data set; the model card's "Known failure modes" counts
# what the model alone does with them). The safety net must stay quiet on the everyday ones whatever the model says.
EVERYDAY_ZH = [
    "不用啦，就是吐槽一下", "吃完饭就去打球", "今天上班好累啊", "我明天要考试，有点紧张", "谢谢你，聊完好多了",
    "最近睡得不太好，老是做梦", "周末打算和朋友去爬山", "老板今天又骂人了，烦死了", "我妈让我早点回家", "下周见",
    "好的，我试试那个呼吸练习", "今天天气真好", "刚下班，准备做饭", "我养的猫生病了，带它去看医生了", "最近工作压力有点大",
    "你好，我想预约下周的咨询", "我男朋友忘了我的生日，有点生气", "考试没考好，心情一般", "吃了药以后头有点晕",
    "晚上失眠，看了会书", "我想换个工作", "孩子今天发烧了", "地铁上人好多", "今天和同事吵了一架", "我觉得自己有点拖延症",
    "最近在减肥，好饿", "我喜欢听音乐放松", "明天要早起赶飞机", "我奶奶去年去世了，有时候会想她", "哈哈，笑死我了",
    "这个作业要了我的命", "我累死了，先睡了", "医生说我的焦虑好一些了", "我每天都按时吃药", "上次你说的方法挺有用的",
    "我和室友关系一般", "心情不好的时候我会去跑步", "有点想家", "今天哭了一会儿，现在好多了", "最近总是很烦躁",
]


@pytest.mark.parametrize("text", EVERYDAY_ZH)
def test_everyday_chinese_chat_raises_nothing(text: str) -> None:
    result = safety_net_scan(text, "zh")
    assert result.tier is None and not result.harm_to_others, result.hits


@pytest.mark.parametrize("text", [
    "我不想活了", "我已经把药攒够了", "我想从楼上跳下去", "今晚就结束这一切", "活着没有意义", "我割了自己的手腕", "我写好了遗书",
    "我想死", "我买了炭，打算这周末", "每天都在想怎么死", "我是家里的累赘", "要是睡着了再也不醒就好了", "我站在天台边上",
    "我想消失", "我真的撑不下去了", "我想伤害自己", "我上个月自杀过一次",
])
def test_risky_chinese_chat_is_counted_alone(text: str) -> None:
    assert safety_net_scan(text, "zh").tier is not None, safety_net_scan(text, "zh").hits


@pytest.mark.parametrize("conversation", [  # a means, a farewell or "nobody cares" alone is not counted; after intent it is
    ["我想死", "刀已经准备好了"], ["我不想活了", "再见了，谢谢你们"], ["我想自杀", "没有人会在乎我死不死"],
])
def test_context_words_in_chinese_chat_count_after_intent(conversation: list[str]) -> None:
    assert safety_net_scan(conversation[1], "zh").tier is None
    assert conversation_scan(conversation, "zh").tier is not None
    assert conversation_scan(conversation, "zh").tier >= RiskTier.MODERATE


# en 1.18.0. "I know how" alone was a plan (high): "I know how you feel" in a supportive reply raised the net to
# high in 52 of the 350 Reddit post histories (and 14 SDCNL posts), and in any empathetic chat turn: a nurse alert.
@pytest.mark.parametrize("text", [
    "I know how you feel", "I know how that sounds, but hear me out", "I know when I'm being lied to",
    "We decided where to go for dinner tonight", "I figured out how to fix my bike today",
    "I picked the date for our wedding", "I know where the pharmacy is", "I know how to tie a tie",
])
def test_knowing_or_deciding_how_is_no_plan_by_itself(text: str) -> None:
    assert safety_net_scan(text, "en").tier is None, safety_net_scan(text, "en").hits


@pytest.mark.parametrize("text", [
    "I know how I am going to kill myself", "I've figured out when I'll end my life", "I picked the date to die",
    "I want to die. I decided when: this weekend", "I know how to tie a noose and I want to die",
    "I know where my dad's gun is. I want to kill myself",
])
def test_a_decided_method_or_date_is_a_plan(text: str) -> None:
    result = safety_net_scan(text, "en")
    assert result.tier is not None and result.tier >= RiskTier.HIGH, result.hits
    assert "plan" in {h.kind for h in result.hits if h.status == "counted"}


@pytest.mark.parametrize("text", [  # was / is / have + not: a denial, like do / will + not
    "I wasn't suicidal, just really tired", "I wasnt suicidal", "I haven't self-harmed in two years",
    "my thoughts aren't suicidal", "I'm worried about my friend, talking to suicidal people is hard",
    "I want to disappear into a book for the weekend",
])
def test_denials_and_other_peoples_risk_are_not_counted_en(text: str) -> None:
    assert safety_net_scan(text, "en").tier is None, safety_net_scan(text, "en").hits


@pytest.mark.parametrize("text", [  # a negation word that denies nothing: a reason held, a struggle, a double negation
    "The only reason I haven't committed suicide is my mom", "The reason I didnt kill myself is my dog",
    "I'm trying hard not to kill myself", "Im trying to not kill myself", "I haven't stopped thinking about suicide",
    "I feel suicidal", "I just want to disappear",
])
def test_a_negation_word_that_denies_nothing_still_counts_en(text: str) -> None:
    assert safety_net_scan(text, "en").tier is not None, safety_net_scan(text, "en").hits


# en 1.19.0, from hand-written chat turns (not from any data set). Taking one's medication is not an overdose, and
# "I won't be here tomorrow" is a farewell only beside an intent.
@pytest.mark.parametrize("text", [
    "I have to take all my meds every morning", "I forgot to take all my pills yesterday",
    "The doctor told me to take all of my medication", "I take all my meds on time now",
    "I'll take all my meds tonight before bed", "I took too many pills by accident", "I took a bunch of vitamins",
    "I'm not going to be here tomorrow, I have a dentist appointment", "I won't be here tomorrow, see you next week",
    "I wrote a note to my boss saying goodbye before my vacation", "Never give up on life!",
])
def test_medication_and_absence_are_not_risk_by_themselves_en(text: str) -> None:
    assert safety_net_scan(text, "en").tier is None, safety_net_scan(text, "en").hits


@pytest.mark.parametrize("text,at_least", [
    ("I took a bunch of pills an hour ago", RiskTier.HIGH), ("I took 30 sleeping pills", RiskTier.HIGH),
    ("I took all my pills at once", RiskTier.HIGH), ("I'm thinking of taking all my pills", RiskTier.HIGH),
    ("I want to die. I am going to take all my pills", RiskTier.HIGH),
    ("I'm going to take all my pills tonight", RiskTier.IMMINENT),
    ("I wrote letters to my family to say goodbye", RiskTier.IMMINENT),
    ("I'm not going to be here much longer", RiskTier.IMMINENT),
    ("I want to die. I won't be here tomorrow", RiskTier.IMMINENT),
    ("I want to go to sleep forever", RiskTier.LOW), ("I feel hopeless and I want to give up on life", RiskTier.LOW),
])
def test_overdoses_farewells_and_passive_wishes_count_en(text: str, at_least: RiskTier) -> None:
    result = safety_net_scan(text, "en")
    assert result.tier is not None and result.tier >= at_least, result.hits


@pytest.mark.parametrize("text,counted", [  # zh 1.18.0 (hand-written, not from any data set)
    ("我知道怎么死了", True), ("我终于知道如何自杀了", True), ("我已经决定好什么时候死", True),
    ("我想死。我已经决定好什么时候走了", True), ("我不知道怎么死", False), ("我决定好什么时候走了，下周的火车", False),
    ("我想去死海旅游", False), ("我想消失一段时间，去旅行散散心", False), ("我想彻底消失", True),
])
def test_knowing_how_to_die_and_look_alikes_zh(text: str, counted: bool) -> None:
    assert (safety_net_scan(text, "zh").tier is not None) is counted, safety_net_scan(text, "zh").hits


@pytest.mark.parametrize("text,counted", [  # zh 1.18.0: written Cantonese (folded) and the Mandarin it mirrors
    ("我唔想再活落去", True), ("活落去冇意思", True), ("活下去没意思", True), ("我唔想再醒返", True),
    ("我覺得自己係個負累", True), ("我觉得自己是个负担", True), ("我死了也没人在乎", True), ("我𠝹咗手", True),
    ("我昨晚又割了手", True), ("我諗緊點樣死", True), ("我已經諗好點死", True), ("我想同呢個世界講拜拜", True),
    ("我切菜割了手", False), ("我割了手指", False), ("家庭负担很重", False), ("我是个负担很重的人", False),
    ("減輕我嘅負擔", False), ("今日返工好攰", False), ("我頭先食咗藥，好返啲", False), ("我部電話死咗機", False),
])
def test_cantonese_and_mandarin_everyday_wishes_zh(text: str, counted: bool) -> None:
    assert (safety_net_scan(text, "zh").tier is not None) is counted, safety_net_scan(text, "zh").hits


@pytest.mark.parametrize("text,lang,flag", [  # zh 1.18.0 / en 1.19.0 (hand-written): threats and their look-alikes
    ("我想拿刀捅死我老板", "zh", True), ("我想把那个渣男砍了", "zh", True), ("我要炸了这个学校", "zh", True),
    ("我真想一刀劈了他", "zh", True), ("我已经想好怎么杀他了", "zh", True),
    ("把这棵树砍了", "zh", False), ("我要把预算砍了", "zh", False), ("把旧衣服都砍了做抹布", "zh", False),
    ("One day I'll make them all pay", "en", True), ("I have a knife and I'm going to use it on him", "en", True),
    ("I'm going to shoot him an email", "en", False), ("I shot him a look", "en", False),
    ("I have a bat and I use it on the weekends", "en", False),
])
def test_threats_to_others_and_look_alikes(text: str, lang: str, flag: bool) -> None:
    assert safety_net_scan(text, lang).harm_to_others is flag, safety_net_scan(text, lang).hits


@pytest.mark.parametrize("text,lang,flag", [  # zh 1.18.0 / en 1.19.0 (hand-written): harm done to the speaker
    ("他威胁要杀了我", "zh", True), ("同学们孤立我，还往我身上泼水", "zh", True), ("我男朋友掐我脖子", "zh", True),
    ("继父摸我", "zh", True), ("我被网暴了", "zh", True), ("他打我电话", "zh", False), ("打我一下试试，哈哈", "zh", False),
    ("妈妈摸我的头", "zh", False), ("He threatened to kill me", "en", True), ("Someone at work is harassing me", "en", True),
    ("My ex is stalking me", "en", True), ("My husband chokes me", "en", True),
    ("My dad hit me up yesterday", "en", False), ("He hit me with a joke", "en", False),
])
def test_victimisation_and_look_alikes(text: str, lang: str, flag: bool) -> None:
    assert safety_net_scan(text, lang).victimisation is flag, safety_net_scan(text, lang).hits


@pytest.mark.parametrize("text,counted", [  # en 1.19.0: "wanna die" is "want to die"; mortality in general is not a wish
    ("I wanna die", True), ("I just wanna die, I can't even do that", True), ("I'm going to die alone, might as well do it now", True),
    ("we are all going to die someday", False), ("everyone will die eventually", False), ("I don't wanna die", False),
])
def test_wanna_die_and_mortality_en(text: str, counted: bool) -> None:
    assert (safety_net_scan(text, "en").tier is not None) is counted, safety_net_scan(text, "en").hits


@pytest.mark.parametrize("text,at_least", [  # en 1.19.0: explicit statements the lexicon missed in short SDCNL posts
    ("Almost shot myself right now", RiskTier.HIGH),
    ("Every night I put my gun in my mouth and struggle not to pull the trigger", RiskTier.HIGH),
    ("Another attempt next week. Hopefully I don't survive", RiskTier.HIGH),
    ("Can you od on advil?", RiskTier.HIGH), ("Is this enough pills?", RiskTier.HIGH),
    ("How easy is it to die by drugs?", RiskTier.HIGH), ("I tried to take as many meds as I could", RiskTier.HIGH),
    ("I keep fantasizing about commiting suicide", RiskTier.MODERATE), ("I'm on the edge of suicide", RiskTier.MODERATE),
    ("I just need a reason not to end my life", RiskTier.MODERATE),
    ("I wish I could find the courage to jump", RiskTier.MODERATE),
    ("I keep thinking about the pills", RiskTier.HIGH), ("There's no way out for me", RiskTier.LOW),
    ("I can't do this anymore", RiskTier.LOW),
])
def test_explicit_statements_short_posts_en(text: str, at_least: RiskTier) -> None:
    result = safety_net_scan(text, "en")
    assert result.tier is not None and result.tier >= at_least, result.hits


@pytest.mark.parametrize("text", [
    "I almost killed myself laughing", "another attempt at the exam", "I took 200mg of ibuprofen for my headache",
    "Is this enough pasta for four people?", "How hard is it to die your hair?",
    "I finally found the courage to ask her out", "I need a reason not to go to work tomorrow",
    "There's no way out of this traffic", "I can't keep going to the gym at 6am", "I don't see the point of this meeting",
    "I keep thinking about my pills, did I take them this morning?", "I can't stop staring at the window",
])
def test_look_alikes_of_short_post_statements_en(text: str) -> None:
    assert safety_net_scan(text, "en").tier is None, safety_net_scan(text, "en").hits


@pytest.mark.parametrize("text,counted", [  # zh 1.18.0: internet euphemisms and their look-alikes
    ("我想紫砂", True), ("想自鲨", True), ("昨天差点紫砂了", True), ("我想重开", True), ("想重开了，这辈子太失败", True),
    ("好想一睡不醒", True), ("我真的坚持不下去了", True),
    ("紫砂壶很好看", False), ("我买了一个紫砂锅", False), ("游戏重开一局", False), ("我想重开这个存档", False),
    ("店铺打算下周重开", False), ("我想重开一家店", False), ("减肥坚持不下去了", False),
])
def test_internet_euphemisms_zh(text: str, counted: bool) -> None:
    assert (safety_net_scan(text, "zh").tier is not None) is counted, safety_net_scan(text, "zh").hits


@pytest.mark.parametrize("text,counted", [  # en 1.19.0, from supportive Reddit histories and chat look-alikes
    ("My first attempt at baking bread failed", False), ("This is my second attempt to pass the driving test", False),
    ("After my first attempt I was in hospital for a week", True), ("My last suicide attempt was in 2019", True),
    ("One of my coworkers committed suicide last summer", False), ("an old acquaintance committed suicide recently", False),
    ("This is my last try before I decide to end things", True), ("I want to end things with my girlfriend", False),
    ("I wish I had the courage to go through with it", True),
    ("Work up the courage to do it. Your friends will care", False),
])
def test_attempts_at_other_things_and_other_peoples_suicide_en(text: str, counted: bool) -> None:
    assert (safety_net_scan(text, "en").tier is not None) is counted, safety_net_scan(text, "en").hits


@pytest.mark.parametrize("text,counted", [  # zh 1.18.0: an aborted attempt
    ("我上次差点跳下去", True), ("昨晚差一点就割下去了", True), ("我差点自杀", True),
    ("差点死掉了，车开太快", False), ("我差点跳起来", False), ("差点笑死", False),
])
def test_almost_attempts_zh(text: str, counted: bool) -> None:
    assert (safety_net_scan(text, "zh").tier is not None) is counted, safety_net_scan(text, "zh").hits


@pytest.mark.parametrize("text,counted", [  # zh 1.18.0: seeking a way to die, and 死心 (to give up hope) is not one
    ("我在找一个死的比较舒服的方法", True), ("想着遗书这么写到底要怎么死", True), ("恳请大家告诉我如何买到大剂量那种药片", True),
    ("我知道怎么死心了", False), ("我在找一个减肥的方法", False), ("医生开了大剂量的维生素", False), ("他到底要怎么死啊，这剧情", False),
])
def test_seeking_a_way_to_die_zh(text: str, counted: bool) -> None:
    assert (safety_net_scan(text, "zh").tier is not None) is counted, safety_net_scan(text, "zh").hits


def test_let_me_give_up_hope_is_not_victimisation_zh() -> None:
    assert not safety_net_scan("我在找一个让我死心的方法", "zh").victimisation
    assert safety_net_scan("我妈逼我去死", "zh").victimisation


# zh 1.19.0 / en 1.20.0 (hand-written, not from any data set): a risk word broken up to get past a keyword
# filter is read as the word; discounts are judged on the word as read.
@pytest.mark.parametrize("text,lang,at_least", [
    ("想自 杀", "zh", RiskTier.MODERATE), ("我想自.杀", "zh", RiskTier.MODERATE), ("好想-死", "zh", RiskTier.MODERATE),
    ("我想自\u200b杀", "zh", RiskTier.MODERATE), ("我想 跳 楼", "zh", RiskTier.HIGH), ("我想zs", "zh", RiskTier.MODERATE),
    ("好想zisha", "zh", RiskTier.MODERATE), ("我想去世", "zh", RiskTier.MODERATE),
    ("i want to k1ll myself", "en", RiskTier.MODERATE), ("k i l l myself", "en", RiskTier.MODERATE),
    ("i want to d*e", "en", RiskTier.MODERATE), ("thinking about su1c1de", "en", RiskTier.MODERATE),
    ("i want to k!ll my\u200bself tonight", "en", RiskTier.HIGH), ("thinking about unaliving myself tonight", "en", RiskTier.HIGH),
    ("honestly i just wanna kms", "en", RiskTier.MODERATE), ("i want to be dead", "en", RiskTier.LOW),
    ("i wanna sleep forever", "en", RiskTier.LOW), ("i relapsed and cut again", "en", RiskTier.MODERATE),
])
def test_broken_up_risk_words_are_read(text: str, lang: str, at_least: RiskTier) -> None:
    got = tier(text, lang)
    assert got is not None and got >= at_least


@pytest.mark.parametrize("text,lang", [
    ("我不想自 杀", "zh"), ("我妈 想自 杀", "zh"), ("今天 累 死了", "zh"), ("手机 死 机了", "zh"), ("我想 去世界各地旅游", "zh"),
    ("想原地去世哈哈", "zh"), ("我要 死记硬背", "zh"), ("笑 死 我了", "zh"), ("我想 死你了", "zh"), ("我想去世纪公园", "zh"),
    ("我爷爷去世了", "zh"), ("我 想 吃 饭", "zh"),
    ("i would never k1ll myself", "en"), ("my friend wants to k i l l herself", "en"), ("i don't want to be dead", "en"),
    ("I'm d3ad tired lol", "en"), ("i'm k*lling it at work", "en"), ("what the h*ll", "en"), ("l33t h4x0r skills", "en"),
    ("I am a k i n d person", "en"), ("ki11 the lights", "en"), ("i want to be deadly at chess", "en"), ("die!", "en"),
])
def test_broken_up_look_alikes_and_discounts(text: str, lang: str) -> None:
    assert tier(text, lang) is None


def test_broken_up_evidence_spans_the_original_characters() -> None:
    text = "你好\n但是我真的想自 杀"
    result = conversation_scan(text.split("\n"), "zh")
    assert [text[e.start:e.end] for e in result.evidence] == ["想自 杀"]
    text = "ok\ni want to k1ll my\u200bself"
    result = conversation_scan(text.split("\n"), "en")
    assert [text[e.start:e.end] for e in result.evidence] == ["k1ll my\u200bself"]


# zh 1.20.0 / en 1.21.0 (hand-written): code-switching. An intent in one language before a risk word in the other
# counts, and a negation or another person in one language discounts a phrase in the other.
@pytest.mark.parametrize("text,counted", [
    ("I want to 自杀", True), ("i'm going to 死", True), ("我想 die", True), ("我想 kill myself", True), ("我真的 want to die", True),
    ("我今晚要 end it all", True), ("I'm going to 跳楼 tonight", True),
    ("我不想 kill myself", False), ("I don't want to 自杀", False), ("my friend 想自杀", False), ("他 wants to die", False),
    ("我妈 wants to die", False), ("我要买 suicide squad 的票", False), ("我想 die hard 那部电影", False),
])
def test_mixed_chinese_and_english(text: str, counted: bool) -> None:
    assert (tier(text) is not None) == counted


@pytest.mark.parametrize("text,expected", [  # zh 1.21.0: meaning to write a suicide note is a plan, a note written is a
    # preparatory act (SOS-4K grades "planning" 6-8 and "likely within days or in progress" 9-10)
    ("我准备写遗书了", RiskTier.HIGH), ("我想开始写遗书了", RiskTier.HIGH), ("我该怎么写遗书呢", RiskTier.HIGH),
    ("我的遗书已经写好了", RiskTier.IMMINENT), ("我写好了遗书", RiskTier.IMMINENT), ("我正在写遗书", RiskTier.IMMINENT),
    ("昨晚写了遗书", RiskTier.IMMINENT), ("我从来没想过写遗书", None), ("她打算写遗书", None),
])
def test_meaning_to_write_a_note_and_a_note_written_zh(text: str, expected: RiskTier | None) -> None:
    assert tier(text, "zh") == expected


@pytest.mark.parametrize("text,expected", [  # zh 1.22.0: 今天 / 马上 time an act, not a feeling
    ("我今天就去死", RiskTier.HIGH), ("今天之内我必须去死", RiskTier.HIGH), ("我明天就去死", RiskTier.HIGH),
    ("我今天要自杀", RiskTier.HIGH), ("我想死，马上就动手", RiskTier.HIGH), ("我今天晚上想自杀", RiskTier.HIGH),
    ("今天也是想死的一天", RiskTier.MODERATE), ("今天好想死", RiskTier.MODERATE), ("今天有想死的冲动", RiskTier.MODERATE),
    ("好想死，马上三十了一事无成", RiskTier.MODERATE),
])
def test_today_times_an_act_not_a_feeling_zh(text: str, expected: RiskTier) -> None:
    assert tier(text, "zh") == expected


@pytest.mark.parametrize("text", [
    "我想自 杀", "今天 累 死了", "我 想 吃 饭", "我不想 自.杀 了 真的", "考试没考好 笑死我了 他又打我了", "i want to k1ll myself",
    "k i l l myself tonight", "what the h*ll", "l33t h4x0r 5pm " * 20, "想 死" + " 今天天气不错" * 30 + " 自 杀",
])
def test_the_cheap_check_before_a_second_reading_loses_no_match(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from cds.nlp import safety_net as sn
    with_check = sn._scan_lexicon(sn.lexicons()["zh"], text) + sn._scan_lexicon(sn.lexicons()["en"], text)
    monkeypatch.setattr(sn, "_may_match_a_change", lambda lex, view: True)
    without = sn._scan_lexicon(sn.lexicons()["zh"], text) + sn._scan_lexicon(sn.lexicons()["en"], text)
    assert with_check == without
