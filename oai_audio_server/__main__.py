from oai_audio_server.cli import main

if __name__ == "__main__":  # also keeps a spawned engine process from running the CLI
    main()
