from distiller.cli import run

run()
