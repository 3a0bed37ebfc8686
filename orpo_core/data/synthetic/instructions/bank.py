"""The built-in content bank of the instruction generator: topics and simple facts.

Every fact is one short, plain English sentence with exactly one comma (so the
``punctuation:no_comma`` constraint has something to remove) and ends with a
period. Topics are lowercase nouns usable in "Write about <topic>."; facts are
written for a small model to imitate, not to be an encyclopedia.
"""

from __future__ import annotations

FACTS: dict[str, tuple[str, ...]] = {
    "bees": (
        "Bees live in large groups, and they share the work.",
        "A bee visits many flowers, collecting nectar and pollen.",
        "Bees make honey, which they store in wax cells.",
        "The queen bee lays the eggs, while workers feed the young.",
        "Bees help plants grow, because they carry pollen between flowers.",
    ),
    "the moon": (
        "The moon circles the Earth, taking about a month.",
        "The moon has no light of its own, so it reflects sunlight.",
        "Its surface is covered with dust, rocks and craters.",
        "The moon pulls on the oceans, causing the tides.",
        "People first walked on the moon in 1969, during the Apollo program.",
    ),
    "rain": (
        "Rain falls from clouds, when water drops grow heavy.",
        "Plants need rain, since it brings water to their roots.",
        "Heavy rain can cause floods, especially near rivers.",
        "After rain, the air often smells fresh and clean.",
        "Some deserts get very little rain, sometimes none for years.",
    ),
    "coffee": (
        "Coffee is made from roasted beans, which grow on shrubs.",
        "Many people drink coffee in the morning, to feel awake.",
        "Coffee contains caffeine, a natural stimulant.",
        "Brazil grows a lot of coffee, more than any other country.",
        "Coffee can be served hot or cold, with or without milk.",
    ),
    "bicycles": (
        "A bicycle has two wheels, a frame and pedals.",
        "Riding a bicycle is good exercise, and it is fun.",
        "Bicycles do not burn fuel, so they are clean to use.",
        "Many cities have bike lanes, which make cycling safer.",
        "A helmet protects the head, in case of a fall.",
    ),
    "volcanoes": (
        "A volcano is an opening in the ground, where hot rock escapes.",
        "Melted rock is called lava, once it reaches the surface.",
        "Some volcanoes sleep for centuries, then erupt again.",
        "Volcanic ash can travel far, carried by the wind.",
        "Soil near volcanoes is rich, so farmers grow crops there.",
    ),
    "penguins": (
        "Penguins are birds, but they cannot fly.",
        "They swim very well, using their wings as flippers.",
        "Most penguins live in the south, near Antarctica.",
        "Penguins eat fish, krill and squid.",
        "A thick layer of fat keeps them warm, even in icy water.",
    ),
    "trees": (
        "Trees make oxygen, which animals need to breathe.",
        "A tree grows a new ring each year, so rings show its age.",
        "Roots hold the soil in place, and they drink water.",
        "Some trees lose their leaves in autumn, then grow new ones in spring.",
        "Birds build nests in trees, where their chicks stay safe.",
    ),
    "the ocean": (
        "The ocean covers most of the Earth, about seventy percent.",
        "Ocean water is salty, so people cannot drink it.",
        "Whales, sharks and dolphins live in the ocean.",
        "The deepest parts of the ocean are dark, cold and quiet.",
        "Waves are made by the wind, blowing across the water.",
    ),
    "bread": (
        "Bread is made from flour, water and yeast.",
        "Yeast makes the dough rise, by releasing gas.",
        "Bread is baked in an oven, until the crust turns brown.",
        "People have eaten bread for thousands of years, all over the world.",
        "Fresh bread smells wonderful, especially when it is warm.",
    ),
    "the sun": (
        "The sun is a star, at the center of our solar system.",
        "It gives the Earth light and heat, which make life possible.",
        "Sunlight takes about eight minutes, to reach the Earth.",
        "The sun is very large, much bigger than the Earth.",
        "Plants use sunlight to make food, in a process called photosynthesis.",
    ),
    "cats": (
        "Cats are curious animals, and they like to explore.",
        "A cat sleeps for many hours, often during the day.",
        "Cats clean their fur with their tongues, several times a day.",
        "Cats can see well in dim light, which helps them hunt.",
        "Many cats purr, when they feel happy and safe.",
    ),
    "chess": (
        "Chess is played on a board, with sixty-four squares.",
        "Each player starts with sixteen pieces, including a king.",
        "The goal is to trap the other king, which is called checkmate.",
        "The queen is the strongest piece, because it moves far in any direction.",
        "Chess teaches patience, planning and focus.",
    ),
    "libraries": (
        "A library lends books, for free in many towns.",
        "Libraries are quiet places, good for reading and study.",
        "Many libraries also offer computers, music and films.",
        "A librarian helps people, when they look for information.",
        "Old libraries keep rare books, some written by hand.",
    ),
    "snow": (
        "Snow forms in cold clouds, when water freezes into crystals.",
        "Every snowflake has six sides, but each one is different.",
        "Children like to build snowmen, after a heavy snowfall.",
        "Snow reflects sunlight, so it can be very bright.",
        "Melting snow feeds rivers, in the spring.",
    ),
    "gardens": (
        "A garden needs sunlight, water and good soil.",
        "Gardeners plant seeds in spring, and they harvest in autumn.",
        "Flowers in a garden attract bees, butterflies and birds.",
        "Weeds compete with plants, so gardeners pull them out.",
        "Growing vegetables at home is healthy, and it saves money.",
    ),
    "trains": (
        "Trains run on rails, which guide their wheels.",
        "A train can carry many people, or heavy goods.",
        "Early trains used steam, made by burning coal.",
        "Modern trains often run on electricity, which is cleaner.",
        "Fast trains connect big cities, in only a few hours.",
    ),
    "music": (
        "Music is made of sounds, arranged in time.",
        "People play music on instruments, such as the piano or guitar.",
        "Songs combine music with words, called lyrics.",
        "Music can change our mood, making us calm or excited.",
        "Every culture has its own music, with its own rhythms.",
    ),
    "mountains": (
        "Mountains are tall landforms, with steep sides.",
        "The air on a mountain top is thin, so breathing is harder.",
        "Snow often covers high mountains, even in summer.",
        "Mount Everest is the highest mountain, in the Himalayas.",
        "Hikers climb mountains for the view, and for the challenge.",
    ),
    "apples": (
        "Apples grow on trees, in many colors.",
        "An apple can be red, green or yellow.",
        "Apples are crunchy and sweet, and they are healthy.",
        "People make juice, pies and sauce from apples.",
        "Apple trees bloom in spring, with white or pink flowers.",
    ),
    "the internet": (
        "The internet connects computers, all around the world.",
        "People use the internet to send messages, read news and shop.",
        "Web pages are stored on servers, which answer requests.",
        "A fast connection loads videos quickly, without waiting.",
        "Passwords protect accounts, so they should be kept secret.",
    ),
    "dogs": (
        "Dogs are loyal animals, and they love their owners.",
        "A dog has a strong sense of smell, much better than ours.",
        "Dogs need daily walks, to stay healthy and happy.",
        "Some dogs help people at work, such as guiding the blind.",
        "Puppies sleep a lot, while they grow.",
    ),
    "rivers": (
        "A river flows downhill, until it reaches the sea or a lake.",
        "Rivers carry fresh water, which people and animals drink.",
        "Fish, frogs and birds live in and near rivers.",
        "Many cities were built beside rivers, for water and trade.",
        "A dam holds back a river, to store water or make electricity.",
    ),
    "stars": (
        "Stars are huge balls of gas, that shine with their own light.",
        "At night we see thousands of stars, if the sky is dark.",
        "Some stars look red, while others look blue or white.",
        "Stars are very far away, so their light takes years to reach us.",
        "Groups of stars form pictures, called constellations.",
    ),
}

#: topics in a fixed order (the generator samples from this tuple)
TOPICS: tuple[str, ...] = tuple(sorted(FACTS))

#: closing phrases for ``startend:end_checker`` (IFEval's two, plus short ones)
END_PHRASES: tuple[str, ...] = (
    "Any other questions?",
    "Is there anything else I can help with?",
    "That is all.",
    "Thank you for reading.",
    "I hope this helps.",
)

#: postscript lines for ``detectable_content:postscript``
POSTSCRIPTS: tuple[str, ...] = (
    "I hope you learned something new.",
    "Thanks for asking.",
    "There is much more to learn.",
    "Feel free to ask for more.",
)

#: keys for ``detectable_format:json_key``
JSON_KEYS: tuple[str, ...] = ("answer", "text", "facts", "summary", "response")
