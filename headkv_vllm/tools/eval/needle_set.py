"""The needles of ``headkv-vllm eval-needle``.

They differ from the head-scoring probes (``headkv_vllm/tools/scoring/probes.py``), so the
evaluation does not test the very facts the scores were made from. Each was kept
because SmolLM2-135M-Instruct answers it with the full cache at 1k-3k tokens and most
depths; without that, "% of full cache" would measure noise.

- retrieval: one made-up fact, asked back.
- reasoning (the R2 probe's shape): two people, one attribute each, and a question
  that picks one of them through another fact, so the needle holds a distractor.
  The answer starts after a prefix that restates the question (the assistant turn is
  continued), as in the R2 probe. SmolLM2-135M cannot do the comparison step of the
  R2 probe ("the older one": it names the first person whatever the ages), so these
  pick the person by a stated fact instead (born in a given year, the taller tower).
"""

from __future__ import annotations

from headkv_vllm.tools.common.needle import Needle

NEEDLES = (
    Needle("ship-name", "retrieval", ("Captain Mirabel's ship is named the Silver Heron.",),
           "What is Captain Mirabel's ship named?", "Silver Heron"),
    Needle("village-jam", "retrieval", ("The village of Ashcombe is famous for its blueberry jam.",),
           "What is the village of Ashcombe famous for?", "blueberry jam"),
    Needle("museum-violin", "retrieval", ("The museum in Brackenfield displays a golden violin.",),
           "What does the museum in Brackenfield display?", "golden violin"),
    Needle("vault-code", "retrieval", ("The secret code for the blue vault is 4729.",),
           "What is the secret code for the blue vault?", "4729"),
    Needle("instrument-by-year", "reasoning",
           ("Clara was born in 1985 and David was born in 1992.", "Clara plays the cello and David plays the flute."),
           "Which instrument does the person born in 1985 play?", "cello", distractor="flute",
           answer_prefix="The person born in 1985 plays the"),
    Needle("roof-of-taller-tower", "reasoning",
           ("The northern tower is taller than the southern tower.", "The northern tower has a copper roof.",
            "The southern tower has a slate roof."),
           "What kind of roof does the taller tower have?", "copper", distractor="slate",
           answer_prefix="The taller tower has a"),
)
