"""Writes fastlm/data/people_json.jsonl, the dataset of the default `fastlm finetune` job.

The task: turn one English sentence about a person into strict one-line JSON with exactly the keys name, age
(an integer) and city, in that order. SmolLM2-135M-Instruct answers in prose or loose JSON without training;
a short QLoRA fine-tune teaches the format. 400 examples, the last 40 held out ("split": "test").
Deterministic (seed 7): run `python scripts/make_demo_data.py` to rebuild the same file.
"""
import json
import os
import random

NAMES = ["Maria", "James", "Aiko", "Omar", "Lena", "Carlos", "Priya", "Tom", "Fatima", "Ivan", "Chloe", "Kwame",
         "Sofia", "Liam", "Mei", "Noah", "Amara", "Lucas", "Elif", "Mateo", "Hana", "Oscar", "Zara", "Felix",
         "Nadia", "Hugo", "Ingrid", "Ravi", "Greta", "Diego", "Yara", "Arjun", "Clara", "Emil", "Leila", "Jonas",
         "Rosa", "Samir", "Anya", "Pablo"]
CITIES = ["Lisbon", "Toronto", "Osaka", "Cairo", "Berlin", "Lima", "Mumbai", "Leeds", "Casablanca", "Kazan",
          "Lyon", "Accra", "Valencia", "Dublin", "Chengdu", "Denver", "Lagos", "Porto", "Izmir", "Bogota", "Kyoto",
          "Oslo", "Nairobi", "Zurich", "Tunis", "Bordeaux", "Bergen", "Pune", "Hamburg", "Quito", "Amman",
          "Chennai", "Vienna", "Aarhus", "Beirut", "Utrecht", "Seville", "Tangier", "Riga", "Cusco"]
TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "Living in {city}, {name} turned {age} this year.",
    "{name} ({age}) moved to {city} last spring.",
    "Meet {name}: {age} years old, based in {city}.",
    "At {age}, {name} calls {city} home.",
    "Our new neighbour in {city} is {name}, who is {age}.",
    "{name}, aged {age}, works as a teacher in {city}.",
    "Born {age} years ago, {name} now lives in {city}.",
]
INSTRUCTION = "Extract the person as JSON with keys name, age, city. Reply with the JSON only.\n\n"


def main() -> None:
    rng = random.Random(7)
    rows = []
    for i in range(400):
        name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 90)
        sentence = rng.choice(TEMPLATES).format(name=name, age=age, city=city)
        answer = json.dumps({"name": name, "age": age, "city": city})
        rows.append({"prompt": INSTRUCTION + sentence, "response": answer, "split": "test" if i >= 360 else "train"})
    path = os.path.join(os.path.dirname(__file__), "..", "fastlm", "data", "people_json.jsonl")
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
