"""Built-in generator of simple English children's stories (the `synthetic-stories` source).

The stories are small enough for a tiny LM to learn in minutes on a CPU, and varied
enough that its validation loss is well below the unigram entropy of the text: every
story has characters (names, pronouns kept consistent), a place, a loved object, a
feeling, some dialogue in quotes, and a small plot (problem -> attempt -> resolution)
drawn from several templates with several wordings per sentence.

Determinism: one ``random.Random(seed)`` is consumed story after story, so
``generate_stories(n, seed)`` is a prefix of ``generate_stories(m, seed)`` for ``n <= m``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

__all__ = ["generate_stories", "iter_stories"]

GIRLS = ["Lily", "Mia", "Emma", "Sara", "Anna", "Lucy", "Zoe", "Ella", "Rosa", "Nina",
         "Amy", "Kate", "Maya", "Ruby", "Sophie", "Grace", "Ava", "Chloe", "Ivy", "Jane"]
BOYS = ["Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Tim", "Finn", "Noah", "Jake",
        "Oscar", "Hugo", "Theo", "Ollie", "Eli", "Luke", "Dan", "Omar", "Ravi", "Joe"]
PET_NAMES = ["Pip", "Spot", "Tiger", "Bella", "Coco", "Fluffy", "Buddy", "Daisy", "Rex",
             "Sunny", "Pepper", "Milo", "Lulu", "Bubbles", "Ziggy", "Honey"]
ANIMALS = ["rabbit", "dog", "cat", "bird", "duck", "mouse", "bear", "fox", "frog",
           "owl", "pig", "lamb", "puppy", "kitten", "turtle", "squirrel"]
ANIMAL_ADJ = ["little", "small", "fluffy", "brown", "white", "tiny", "happy", "curious"]
GROWNUPS = [("Mom", "she"), ("Dad", "he"), ("Grandma", "she"), ("Grandpa", "he"),
            ("the old farmer", "he"), ("the kind teacher", "she")]
PLACES = ["the park", "the forest", "the garden", "the beach", "the farm", "the lake",
          "the big hill", "the playground", "the meadow", "the river", "the town square",
          "the backyard"]
PLACE_ADJ = ["big green", "quiet", "sunny", "pretty", "busy", "windy", "old", "bright"]
COLORS = ["red", "blue", "green", "yellow", "pink", "purple", "orange", "shiny", "soft", "little"]
OBJECTS = ["ball", "kite", "teddy bear", "toy boat", "hat", "drum", "book", "doll",
           "toy car", "scarf", "balloon", "bucket", "whistle", "box of crayons", "jump rope"]
TIMES = ["Once upon a time", "One day", "One sunny morning", "On a rainy afternoon",
         "Last summer", "One cold winter day", "Early one morning", "One windy day"]
ACTIVITIES = ["play outside", "sing songs", "run fast", "draw pictures", "read books",
              "look at the clouds", "dig in the sand", "jump in puddles", "build towers",
              "dance", "count the stars", "pick flowers"]
HIDING = ["under a big bush", "behind a tree", "in the tall grass", "under a pile of leaves",
          "next to a big rock", "inside an old box", "under the bench", "by the little pond"]
FOODS = ["cookies", "muffins", "a cake", "bread", "soup", "pancakes", "sandwiches", "a pie"]
FEARS = [("the dark", "the dark"), ("thunder", "the loud thunder"),
         ("the big dog next door", "the big dog"), ("the deep water", "the water"),
         ("the tall slide", "the slide")]
SAID = ["said", "asked", "shouted", "whispered", "cried", "called"]
HAPPY = ["happy", "glad", "very happy", "so happy", "excited", "proud"]
SAD = ["sad", "very sad", "upset", "worried", "unhappy"]


class _Who:
    """A character and the words that refer to them."""

    __slots__ = ("name", "he", "him", "his", "intro")

    def __init__(self, name: str, he: str, intro: str) -> None:
        self.name = name
        self.he = he
        self.him = "him" if he == "he" else "her"
        self.his = "his" if he == "he" else "her"
        self.intro = intro


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _person(rng: random.Random, avoid: str = "") -> _Who:
    kind = rng.random()
    if kind < 0.4:
        name = rng.choice([n for n in GIRLS if n != avoid] if avoid in GIRLS else GIRLS)
        return _Who(name, "she", rng.choice(["a little girl named", "a girl named", "a kind girl named"]) + " " + name)
    if kind < 0.8:
        name = rng.choice([n for n in BOYS if n != avoid] if avoid in BOYS else BOYS)
        return _Who(name, "he", rng.choice(["a little boy named", "a boy named", "a brave boy named"]) + " " + name)
    name = rng.choice([n for n in PET_NAMES if n != avoid] if avoid in PET_NAMES else PET_NAMES)
    animal = rng.choice(ANIMALS)
    adj = rng.choice(ANIMAL_ADJ)
    return _Who(name, rng.choice(["he", "she"]), f"{_a(adj)} {animal} named {name}")


def _say(rng: random.Random, who: _Who, words: str) -> str:
    if words.endswith("?"):
        verb = "asked"
    elif words.endswith("!"):
        verb = rng.choice(["shouted", "cried", "called", "said"])
    else:
        verb = rng.choice(["said", "said", "whispered", "replied"])
    if rng.random() < 0.5:
        # Quote first: a closing full stop becomes a comma ("Yes," said Tom.).
        quoted = words[:-1] + "," if words.endswith(".") else words
        return f'"{quoted}" {verb} {who.name}.'
    return f'{_cap(who.name)} {verb}, "{words}"'


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


class _Story:
    """Mutable context shared by the sentences of one story."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.hero = _person(rng)
        self.friend = _person(rng, avoid=self.hero.name)
        self.grownup, grownup_he = rng.choice(GROWNUPS)
        self.grownup_he = grownup_he
        self.place = rng.choice(PLACES)
        self.place_adj = rng.choice(PLACE_ADJ)
        self.color = rng.choice(COLORS)
        self.obj = rng.choice(OBJECTS)
        self.thing = f"{self.color} {self.obj}"
        self.lines: list[str] = []

    def add(self, *options: str) -> None:
        self.lines.append(self.rng.choice(options))

    def say(self, who: _Who, *options: str) -> None:
        self.lines.append(_say(self.rng, who, self.rng.choice(options)))


def _opening(s: _Story) -> None:
    h, r = s.hero, s.rng
    time = r.choice(TIMES)
    s.add(f"{time}, there was {h.intro}.",
          f"{time}, {h.intro} lived near {s.place}.",
          f"There once was {h.intro}.",
          f"{time}, {h.intro} went to {s.place} to play.")
    s.add(f"{_cap(h.he)} loved to {r.choice(ACTIVITIES)}.",
          f"{_cap(h.he)} liked to {r.choice(ACTIVITIES)} and {r.choice(ACTIVITIES)}.",
          f"Every day, {h.name} wanted to {r.choice(ACTIVITIES)}.",
          f"{h.name} was a {r.choice(['happy', 'kind', 'funny', 'busy', 'curious'])} child who loved to {r.choice(ACTIVITIES)}.")
    if r.random() < 0.7:
        s.add(f"{_cap(h.he)} had {_a(s.thing)} that {h.he} loved very much.",
              f"{h.name}'s favorite toy was {_a(s.thing)}.",
              f"{_cap(s.grownup)} gave {h.him} {_a(s.thing)}, and {h.he} took it everywhere.")


def _plot_lost(s: _Story) -> None:
    h, f, r = s.hero, s.friend, s.rng
    spot = r.choice(HIDING)
    s.add(f"One day, {h.name} took the {s.obj} to the {s.place_adj} {s.place[4:]}.",
          f"{h.name} went to {s.place} with {h.his} {s.thing}.")
    s.add(f"{_cap(h.he)} played and played, but then the {s.obj} was gone!",
          f"When {h.he} looked down, the {s.obj} was not there anymore.",
          f"After a while, {h.name} could not find {h.his} {s.obj}.")
    s.add(f"{h.name} felt {r.choice(SAD)}.", f"{h.name} was {r.choice(SAD)} and started to cry.")
    s.say(h, f"Where is my {s.obj}?", f"I lost my {s.obj}!", f"Oh no, my {s.obj} is gone!")
    s.add(f"Then {f.intro} came by.", f"Just then, {h.his} friend {f.name} walked over.")
    s.say(f, "Don't worry, I will help you look.", "Let's look for it together.",
          "Do not be sad. We can find it!")
    s.add("They looked under the slide and behind the swings.",
          "They looked high and low, but they did not see it.",
          "First they looked near the gate, and then they looked by the trees.")
    s.add(f"At last, {f.name} saw something {s.color} {spot}.",
          f"Then {h.name} heard a little noise {spot}.")
    s.add(f"It was the {s.obj}!", f"There was the {s.thing}!")
    s.say(h, "Thank you, you found it!", "Yay! Thank you so much!", "You are a good friend!")
    s.add(f"{h.name} was {r.choice(HAPPY)}.",
          f"{h.name} gave {f.name} a big hug.")


def _plot_stuck(s: _Story) -> None:
    h, f, r = s.hero, s.friend, s.rng
    s.add(f"One windy day, {h.name} and {f.name} went to {s.place} with {_a(s.color)} kite.",
          f"{h.name} wanted to fly {_a(s.color)} kite at {s.place}.")
    s.add("The wind was strong, and the kite went up, up, up.",
          "The kite flew very high in the sky.")
    s.add("But then the kite got stuck in a tall tree.",
          "Suddenly, the string broke and the kite landed on a high branch.")
    s.say(h, "Oh no! My kite is stuck!", "How will we get it down?", "I can't reach it!")
    s.add(f"{h.name} jumped as high as {h.he} could, but {h.he} could not reach it.",
          f"{h.name} tried to shake the tree, but the kite did not move.",
          f"{f.name} threw a little stick, but it did not help.")
    s.add(f"{h.name} felt {r.choice(SAD)}.", f"They were {r.choice(SAD)}.")
    s.add(f"Then {h.name} had an idea.", f"Then {f.name} had a good idea.")
    s.say(h if r.random() < 0.5 else f, f"Let's ask {s.grownup} for help!",
          f"{_cap(s.grownup)} has a long ladder!")
    s.add(f"{_cap(s.grownup)} came with a ladder and climbed up the tree.",
          f"{_cap(s.grownup)} used a long stick to push the kite down.")
    s.add("The kite fell down softly into the grass.",
          f"Soon the kite was back in {h.name}'s hands.")
    s.say(h, "Thank you!", "Thank you so much!", "Hooray!")
    s.add(f"{h.name} and {f.name} flew the kite again, but not near the tree this time.",
          "They laughed and played until the sun went down.")


def _plot_scared(s: _Story) -> None:
    h, f, r = s.hero, s.friend, s.rng
    fear, short = r.choice(FEARS)
    s.add(f"But {h.name} was scared of {fear}.", f"There was one thing {h.name} did not like: {fear}.")
    s.add(f"One night, {h.name} could not sleep because of {short}.",
          f"One day, {h.name} had to be brave, but {h.he} was very scared of {short}.",
          f"When {h.he} saw {short}, {h.his} legs began to shake.")
    s.say(h, "I am scared!", f"I don't like {short}!", "I want to go home!")
    s.add(f"{_cap(s.grownup)} sat down next to {h.him}.",
          f"{f.name} held {h.his} hand.")
    s.say(f, "It is okay to be scared.",
          "You are braver than you think.", "We can do it together.")
    s.add(f"{h.name} took a deep breath.", f"{h.name} counted to ten and took a big breath.")
    s.add(f"Slowly, {h.he} looked at {short} again.",
          f"Step by step, {h.name} went closer to {short}.")
    s.add("It was not so bad after all.", f"{_cap(short)} was not scary anymore.")
    s.add(f"{h.name} felt {r.choice(['brave', 'proud', 'strong', 'happy'])}.",
          f"{h.name} smiled a big smile.")
    s.say(h, "I did it!", "I am not scared anymore!", "That was not so scary!")


def _plot_broken(s: _Story) -> None:
    h, f, r = s.hero, s.friend, s.rng
    s.add(f"One day, {f.name} came over to play with the {s.obj}.",
          f"{h.name} and {f.name} were playing with the {s.thing} at {s.place}.")
    s.add(f"They played too hard, and the {s.obj} broke.",
          f"Oops! The {s.obj} fell down and broke into two pieces.",
          f"{f.name} dropped the {s.obj}, and it broke.")
    s.add(f"{h.name} was {r.choice(SAD)}, and {f.name} was {r.choice(SAD)} too.",
          f"{h.name} felt like crying.")
    s.say(f, "I am sorry. I did not mean to break it.", "I am so sorry!")
    s.say(h, "It is okay. Maybe we can fix it.", "Let's try to fix it.")
    s.add("They tried to fix it with tape, but it did not hold.",
          "First they used some string, but it was too weak.")
    s.add(f"So they asked {s.grownup} for help.", f"Then they took it to {s.grownup}.")
    s.add(f"{_cap(s.grownup)} used some glue and fixed the {s.obj}.",
          f"{_cap(s.grownup)} smiled and said it was easy to fix.")
    s.add(f"Now the {s.obj} was as good as new!", f"Soon the {s.obj} was fixed.")
    s.add(f"{h.name} and {f.name} were {r.choice(HAPPY)}.",
          "They played again, but this time they were careful.")


def _plot_share(s: _Story) -> None:
    h, f, r = s.hero, s.friend, s.rng
    s.add(f"One day, {h.name} and {f.name} both wanted to play with the {s.thing}.",
          f"At {s.place}, {f.name} saw {h.name}'s {s.obj} and wanted it too.")
    s.say(f, f"Can I play with your {s.obj}?", "Can I have a turn?", "Please, can I try?")
    s.say(h, f"No, it is my {s.obj}!", "No! It is mine!", "Not now, I am playing.")
    s.add(f"{f.name} felt {r.choice(SAD)} and walked away.",
          f"{f.name} looked at the ground and did not say anything.",
          f"They both pulled the {s.obj}, and they were angry.")
    s.add(f"{h.name} played alone, but it was not fun.",
          f"Soon {h.name} felt bad inside.",
          f"Then {h.name} saw that {f.name} was sad.")
    s.say(h, f"I am sorry, {f.name}. Let's play together.",
          "You can have a turn. We can share.", "Let's take turns!")
    s.add(f"{f.name} smiled.", f"{f.name} was {r.choice(HAPPY)}.")
    s.add(f"They took turns with the {s.obj}, and it was much more fun.",
          f"They played with the {s.obj} together all afternoon.")
    s.add(f"{h.name} learned that sharing makes everyone happy.",
          "Playing together was better than playing alone.")


def _plot_bake(s: _Story) -> None:
    h, f, r = s.hero, s.friend, s.rng
    food = r.choice(FOODS)
    s.add(f"One morning, {h.name} wanted to make {food} for {f.name}.",
          f"It was {f.name}'s birthday, and {h.name} wanted to make {food}.")
    s.say(h, f"I will make {food} all by myself!", "I can do it!")
    s.add(f"{_cap(h.he)} got a big bowl, some flour and some milk.",
          f"{_cap(h.he)} put flour, eggs and sugar in a bowl.")
    s.add("But the flour went everywhere, and the kitchen was a big mess.",
          "But the bowl fell down, and the milk spilled on the floor.",
          f"But {h.he} did not know how hot the oven should be.")
    s.add(f"{h.name} felt {r.choice(SAD)}.", f"{h.name} sat on the floor and sighed.")
    s.add(f"Then {s.grownup} came into the kitchen.", f"Just then, {s.grownup} walked in.")
    s.lines.append(_say(r, _Who(s.grownup, s.grownup_he, ""),
                        r.choice(["Let's do it together.", "I can help you.",
                                  "Everyone makes a mess sometimes."])))
    s.add("They cleaned up and started again, step by step.",
          "Together they mixed everything and put it in the oven.")
    s.add("Soon the house smelled sweet and warm.",
          f"After a while, the {food.split()[-1]} were ready." if food.endswith("s")
          else f"After a while, the {food.split()[-1]} was ready.")
    s.add(f"{h.name} gave the {food.split()[-1]} to {f.name}.",
          f"{f.name} came over, and they ate together.")
    s.say(f, "This is the best!", "Yum! Thank you!", "You made this for me?")
    s.add(f"{h.name} was {r.choice(HAPPY)}.", f"{h.name} felt warm and {r.choice(HAPPY)} inside.")


def _plot_climb(s: _Story) -> None:
    h, f, r = s.hero, s.friend, s.rng
    s.add(f"Near {s.place} there was a very big hill.",
          f"One day, {h.name} saw a tall hill far away.")
    s.say(h, "I want to climb to the top!", "I will climb that hill!",
          "I wonder what I can see from up there.")
    s.add(f"{_cap(h.he)} started to climb, but the hill was steep.",
          "The path was long, and the rocks were slippery.")
    s.add(f"Halfway up, {h.name} was tired and wanted to stop.",
          f"{h.name} slipped and fell down, and {h.his} knee hurt.")
    s.say(h, "I can't do it.", "It is too hard!")
    s.add(f"Then {f.name} came running up the path.", f"Just then, {f.name} caught up with {h.him}.")
    s.say(f, "Don't give up! We can go slowly.", "Take my hand. We can climb together.")
    s.add("They walked slowly and rested when they were tired.",
          "Step by step, they climbed higher and higher.")
    s.add("At last, they reached the top.", "Finally, they stood on the top of the hill.")
    s.add(f"They could see {s.place}, the houses and the river below.",
          "The sky was big and blue, and the wind was cool.")
    s.say(h, "We did it!", "Look how far we can see!", "Thank you for helping me.")
    s.add(f"{h.name} felt {r.choice(['proud', 'happy', 'strong'])}.",
          f"{h.name} and {f.name} cheered.")


PLOTS: list[Callable[[_Story], None]] = [
    _plot_lost, _plot_stuck, _plot_scared, _plot_broken, _plot_share, _plot_bake, _plot_climb,
]


def _ending(s: _Story) -> None:
    h, f, r = s.hero, s.friend, s.rng
    if r.random() < 0.8:
        s.add(f"From that day on, {h.name} and {f.name} were best friends.",
              f"That night, {h.name} went to bed with a big smile.",
              f"{h.name} would always remember that day.",
              "It was the best day ever.",
              f"{h.name} learned that it is good to ask for help.",
              "And they lived happily ever after.")
    if r.random() < 0.2:
        s.lines.append("The end.")


def _story(rng: random.Random) -> str:
    s = _Story(rng)
    _opening(s)
    rng.choice(PLOTS)(s)
    _ending(s)
    # A few stories break into paragraphs, as real ones do, so newlines are in the data.
    if rng.random() < 0.3 and len(s.lines) > 6:
        cut = rng.randrange(3, len(s.lines) - 2)
        return " ".join(s.lines[:cut]) + "\n\n" + " ".join(s.lines[cut:])
    return " ".join(s.lines)


def iter_stories(n: int, seed: int = 1337) -> Iterator[str]:
    """Yield ``n`` stories; the same ``(n, seed)`` always gives the same text."""
    rng = random.Random(seed)
    for _ in range(n):
        yield _story(rng)


def generate_stories(n: int, seed: int = 1337) -> list[str]:
    """Return ``n`` deterministic synthetic children's stories."""
    return list(iter_stories(n, seed))
