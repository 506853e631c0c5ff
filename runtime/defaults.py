"""Every default that more than one module uses, each with why it has its value (and where it is a guess).

A bottom layer: plain numbers, importable from anywhere. A module-local default (a prompt's clip length, a
benchmark's repeat count) stays beside the code it tunes.
"""

# ---- retrieval ---------------------------------------------------------------------------------------------------

# 3: as many past mistakes as SALAM's examination shows; not tuned on redpen's benchmarks.
RETRIEVAL_K = 3
# 0.5 cosine on MiniLM: a guess from reading retrieved pairs; below it a "similar" mistake is mostly another topic.
RETRIEVAL_THRESHOLD = 0.5

# ---- gathering ---------------------------------------------------------------------------------------------------

# 3: the SALAM paper's limit on feedback rounds per question; later rounds rarely turn a wrong answer right.
ROUNDS = 3

# ---- generation --------------------------------------------------------------------------------------------------

# 128: room for a short reason before "The answer is (X)"; past that the 135M default mostly repeats itself.
STUDENT_MAX_NEW_TOKENS = 128
# 160: a JSON reason + guideline fits; longer replies from a small model ramble and leak.
ASSISTANT_MAX_NEW_TOKENS = 160
# 256: room for a GSM8K chain of thought ending "The answer is N"; a guess, not measured on every task.
REASONING_MAX_NEW_TOKENS = 256
# 384: code replies (MBPP, HumanEval). Measured with the default model's tokenizer, the canonical solutions in a code
# block take 63 tokens at the median and 274 at p99 on MBPP, and restating a HumanEval function with its docstring
# 188 at the median and 345 at p90.
CODE_MAX_NEW_TOKENS = 384

# ---- LEMA correction data ----------------------------------------------------------------------------------------

# 4 reasoning paths per problem: a guess that trades distinct wrong paths to correct against sampling cost.
SAMPLES = 4

# ---- batching and concurrency ------------------------------------------------------------------------------------

# 32 rows: a float32 decode step of the default model on 2 CPU cores (300-token cache) gives 29 tok/s at 1 row, 147
# at 16, 186 at 32, 198 at 48, 223 at 64; past 32 each step gets slower for little more, and a slower step
# lengthens every episode's chain of dependent calls.
LOCAL_MAX_BATCH = 32
# 256 requests in flight to a server: what one vLLM replica schedules at once by default (`vllm serve`'s
# max_num_seqs is 256 on most GPUs; 1024 on >= 70 GiB ones other than the A100, where `max_concurrency` can be
# raised). Fewer leaves its batch part-empty; more only queue in the server. A rate-limited API wants fewer.
SERVER_MAX_CONCURRENCY = 256
# Conversations in flight where no backend says (``Backend.capacity``): as many as the local backend decodes
# at once, so its batch stays full.
CONCURRENCY = LOCAL_MAX_BATCH

# ---- fine-tuning -------------------------------------------------------------------------------------------------

# 30 steps of 4 rows: a few passes over the tens of rewarded rows a laptop gathering yields, in ~5 minutes on
# 2 CPU cores; more steps on so few rows learn them by heart. Raise it with more data or a GPU.
MAX_STEPS = 30

# ---- bounds: the most a setting may ask for ----------------------------------------------------------------------
# Ceilings far above any real use, that stop a slip (three zeros too many) from building millions of clients, queuing
# a billion items or hanging a run; each setting declares its bound where it is declared (runtime.bounds).

# 4096 in flight: 4x the largest batch vLLM schedules by default (1024); more only queue, each one a coroutine and
# its buffers, and a billion built clients one by one before the first request (issue 25: it hung).
MOST_IN_FLIGHT = 4096
# 32,768 tokens a reply: the whole context of the longest-context models redpen is used with (the default model's is
# 8,192); a reply past its model's context is refused by the prompt-fit check anyway.
MOST_NEW_TOKENS = 32_768
# 200 samples an item: Chen et al. (2021) draw 200 per problem to estimate pass@1..100; more is only cost.
MOST_SAMPLES = 200
# Seeds 0 .. 2**32 - 1: what numpy's and transformers' set_seed accept; random.Random would take more.
MOST_SEED = 2**32 - 1
# 1,000,000 optimisation steps: weeks of CPU training at ~10 s a step; a slip beyond it would never finish.
MOST_STEPS = 1_000_000
# 100,000 items or rows per target per iteration: past the largest train part redpen loads (BBQ's 58k questions);
# each is answered by the current model every iteration.
MOST_ITEMS = 100_000
