/*
 * Saves, loads, subscribes and prints a change, through the C ABI.
 *
 *   cargo build -p trebuchet-postgres-ffi
 *   cc -I include examples/c/quickstart.c -L target/debug -ltrebuchet_postgres_c \
 *      -Wl,-rpath,target/debug -o quickstart
 *   ./quickstart postgresql://postgres@localhost:5432/trebuchet
 *
 * Without an argument the connection comes from the environment
 * (DATABASE_URL, or POSTGRES_HOST and friends). TREBUCHET_TABLE and
 * TREBUCHET_CHANNEL, when set, choose the table and channel.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "trebuchet_postgres.h"

static int fail(const char *what, trebuchet_status status) {
  fprintf(stderr, "%s: %s: %s\n", what, trebuchet_status_name(status), trebuchet_last_error());
  return 1;
}

int main(int argc, char **argv) {
  const char *table = getenv("TREBUCHET_TABLE");
  const char *channel = getenv("TREBUCHET_CHANNEL");
  trebuchet_store *store = NULL;
  trebuchet_listener *listener = NULL;
  trebuchet_subscription *room = NULL;
  trebuchet_buffer *loaded = NULL;
  int rc = 1;

  trebuchet_status st = argc > 1 ? trebuchet_store_open(argv[1], table, channel, &store)
                                 : trebuchet_store_open_env(table, channel, &store);
  if (st != TREBUCHET_OK) return fail("open", st);
  if ((st = trebuchet_store_migrate(store)) != TREBUCHET_OK) { fail("migrate", st); goto out; }

  /* Subscribe before writing, so the change cannot be missed. */
  if ((st = trebuchet_listener_open(store, &listener)) != TREBUCHET_OK) { fail("listen", st); goto out; }
  if ((st = trebuchet_listener_subscribe(listener, "room-1", &room)) != TREBUCHET_OK) {
    fail("subscribe", st);
    goto out;
  }

  const char *state = "{\"players\":2}";
  uint64_t sequence = 0;
  st = trebuchet_store_save(store, "room-1", (const uint8_t *)state, strlen(state), &sequence);
  if (st != TREBUCHET_OK) { fail("save", st); goto out; }
  printf("saved room-1 at sequence %" PRIu64 "\n", sequence);

  if ((st = trebuchet_store_load(store, "room-1", &loaded)) != TREBUCHET_OK) { fail("load", st); goto out; }
  const uint8_t *data = NULL;
  size_t len = 0;
  trebuchet_buffer_get(loaded, &data, &len);
  printf("loaded room-1: %.*s\n", (int)len, (const char *)data);

  trebuchet_event event;
  if ((st = trebuchet_subscription_next(room, 5000, &event)) != TREBUCHET_OK) {
    fail("wait for a change", st);
    goto out;
  }
  if (event.kind == TREBUCHET_EVENT_RESYNC) {
    printf("resync: reload everything\n");
  } else {
    printf("change: %s %s at sequence %" PRIu64 "\n", event.actor_id,
           event.kind == TREBUCHET_EVENT_SAVED ? "saved" : "deleted", event.sequence);
  }
  rc = 0;

out:
  /* Each _free sets the pointer to NULL: freeing twice is harmless. */
  trebuchet_buffer_free(&loaded);
  trebuchet_subscription_free(&room);
  trebuchet_listener_free(&listener);
  trebuchet_store_free(&store);
  return rc;
}
