from oai_audio_server.cli import main

main()
