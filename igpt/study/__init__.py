"""A scaling study: a ladder of sizes through the paper's procedure per rung (igpt/study/study_job.py), and the
README's main job, a one-rung study on the shipped sample (igpt/study/main_job.py)."""
