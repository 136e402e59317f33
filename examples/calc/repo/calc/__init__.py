"""A small calculator, built task by task by gobrr's scripted agent."""
