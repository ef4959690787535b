"""The web studio: a workspace's runs, data, configs, jobs, evaluations, chat and servers in a
browser, for a team (`llmlab studio --workspace DIR`)."""
