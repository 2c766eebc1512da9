"""Training data for the demo model: generated Kimi chats and plain English.

Every conversation is a list of OpenAI-style messages; the training tool
renders it with the model's own chat templates. Facts are few and fixed so a
small model can learn them in minutes; what matters is readable sentences, the
chat format, Kimi-K2's tool calls and ``<think>`` blocks.
"""

import json
import random

from kimizmq.demomodel import THINK_SYSTEM, TOOLS

OTHER_SYSTEMS = [
    "You are a helpful assistant.",
    "You are Kimi, a friendly assistant. Answer briefly.",
    "You are a patient teacher.",
]

TOPICS = {
    "pipelines of Macs": "A pipeline of Macs runs one large model on several machines. Each Mac holds a few layers, and the activations travel from one Mac to the next over the network.",
    "the moon": "The moon is the natural satellite of the Earth. It has no air and no water, and its light is the light of the sun reflected from its grey surface.",
    "the sun": "The sun is the star at the centre of our solar system. It is a huge ball of hot gas, and its light and heat make life on Earth possible.",
    "the ocean": "The ocean covers most of the surface of the Earth. It is deep, salty and full of life, from tiny plankton to the great blue whale.",
    "coffee": "Coffee is a drink made from roasted coffee beans. Many people drink a cup in the morning, because it is warm and it helps them wake up.",
    "tea": "Tea is a drink made by pouring hot water over dried tea leaves. It is popular all over the world, with milk, with lemon or on its own.",
    "trains": "A train is a line of carriages that runs on rails. Trains carry people and goods between cities, and they are a quiet and efficient way to travel.",
    "Python": "Python is a programming language that is easy to read and to write. People use it for web servers, science, data and machine learning.",
    "computers": "A computer is a machine that follows instructions. It stores numbers in memory and changes them very quickly, one small step at a time.",
    "cats": "A cat is a small animal with soft fur, sharp claws and good eyes. Cats like to sleep in warm places, and they are very curious.",
    "dogs": "A dog is a loyal animal that has lived with people for thousands of years. Dogs like to run, to play and to be near their family.",
    "music": "Music is the art of putting sounds together in time. It can be made with voices or with instruments such as the piano, the guitar and the drum.",
}

TOPIC_QUESTIONS = [
    "Tell me about {t}.",
    "What can you tell me about {t}?",
    "Explain {t} in simple words.",
    "Can you describe {t}?",
    "I would like to learn about {t}.",
    "Please tell me about {t}.",
]

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Brazil": "Brasilia",
    "Argentina": "Buenos Aires",
}
CAPITAL_QUESTIONS = [
    "What is the capital of {c}?",
    "Which city is the capital of {c}?",
    "Tell me the capital of {c}.",
]

GREETINGS = ["Hello!", "Hi!", "Hello, who are you?", "Good morning!", "Hi there.", "Hey, how are you?"]
GREETING_ANSWERS = [
    "Hello! I am Kimi, an AI assistant. How can I help you today?",
    "Hi! I am Kimi. I am happy to help. What would you like to know?",
]
THANKS = ["Thank you!", "Thanks, that helps.", "Great, thank you."]
THANKS_ANSWER = "You are welcome! Let me know if there is anything else I can do for you."

CITIES = [
    "Paris",
    "London",
    "Berlin",
    "Tokyo",
    "Beijing",
    "Madrid",
    "Rome",
    "Oslo",
    "Cairo",
    "Lima",
    "Sydney",
    "Toronto",
]
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy"]

WEATHER_QUESTIONS = [
    "What is the weather in {c}?",
    "What's the weather like in {c} today?",
    "Is it raining in {c}?",
    "How warm is it in {c} right now?",
]
TIME_QUESTIONS = ["What time is it in {c}?", "What is the local time in {c}?", "Tell me the time in {c}."]


def tool_call(name: str, arguments: dict) -> dict:
    """One OpenAI-style tool call with Kimi's own id, functions.NAME:0."""
    call_id = f"functions.{name}:0"
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def tool_exchange(rng: random.Random) -> tuple[list[dict], list[str]]:
    """A question that needs a tool, the call, the tool's answer and the reply."""
    kind = rng.choice(["get_weather", "get_weather", "get_time"])
    if kind == "get_weather":
        city = rng.choice(CITIES)
        temp, cond = rng.randint(-5, 35), rng.choice(CONDITIONS)
        question = rng.choice(WEATHER_QUESTIONS).format(c=city)
        args, result = {"city": city}, {"city": city, "temperature": temp, "condition": cond}
        reply = f"It is {cond} in {city} right now, and the temperature is {temp} degrees Celsius."
    else:
        city = rng.choice(CITIES)
        time = f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
        question = rng.choice(TIME_QUESTIONS).format(c=city)
        args, result = {"city": city}, {"city": city, "time": time}
        reply = f"The local time in {city} is {time}."
    call = tool_call(kind, args)
    messages = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "name": kind, "content": json.dumps(result)},
        {"role": "assistant", "content": reply},
    ]
    return messages, [kind]


def plain_exchange(rng: random.Random) -> tuple[list[dict], str]:
    """A question without tools, its answer, and the reasoning behind it."""
    kind = rng.random()
    if kind < 0.5:
        topic = rng.choice(list(TOPICS))
        question = rng.choice(TOPIC_QUESTIONS).format(t=topic)
        answer = TOPICS[topic]
        thought = f"The user asks about {topic}. I will explain it simply."
    elif kind < 0.8:
        country = rng.choice(list(CAPITALS))
        question = rng.choice(CAPITAL_QUESTIONS).format(c=country)
        answer = f"The capital of {country} is {CAPITALS[country]}."
        thought = f"The user asks for the capital of {country}. It is {CAPITALS[country]}."
    elif kind < 0.9:
        question, answer = rng.choice(GREETINGS), rng.choice(GREETING_ANSWERS)
        thought = "The user greets me. I will greet them back and offer help."
    else:
        question, answer = rng.choice(THANKS), THANKS_ANSWER
        thought = "The user thanks me. I will answer politely."
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], thought


def conversation(rng: random.Random) -> dict:
    """One training conversation: messages, declared tools, and whether the
    last answer carries reasoning (then it also says which)."""
    thinking = rng.random() < 0.2
    messages: list[dict] = []
    if thinking:
        messages.append({"role": "system", "content": THINK_SYSTEM})
    elif rng.random() < 0.2:
        messages.append({"role": "system", "content": rng.choice(OTHER_SYSTEMS)})
    tools: list[str] = []
    use_tools = not thinking and rng.random() < 0.45
    n_turns = rng.choice([1, 1, 1, 2])
    thought = ""
    for turn in range(n_turns):
        if use_tools and (turn == n_turns - 1 or rng.random() < 0.5):
            exchange, needed = tool_exchange(rng)
            tools += [t for t in needed if t not in tools]
        else:
            exchange, thought = plain_exchange(rng)
        messages += exchange
    declared = None
    if tools:
        extra = [t for t in TOOLS if t not in tools and rng.random() < 0.5]
        names = tools + extra
        rng.shuffle(names)
        declared = [TOOLS[t] for t in names]
    elif not thinking and rng.random() < 0.1:
        declared = [TOOLS[t] for t in rng.sample(list(TOOLS), rng.randint(1, len(TOOLS)))]
    return {"messages": messages, "tools": declared, "thought": thought if thinking else None}
