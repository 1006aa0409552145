// What the tests watch a client with: every event it dispatches, in order, and bounded waits
// for them. No tests of its own (node --test loads it as a file of test/ and finds none).

import { WebSocket } from "ws";

export const EVENTS = [
  "welcome",
  "resumed",
  "resync",
  "frame",
  "ack",
  "error",
  "gap",
  "close",
  "reconnecting",
];

/** Record the events of `client`: {seen, of(name), wait(name, count, ms)}. */
export function record(client) {
  const seen = [];
  let wake = () => {};
  for (const name of EVENTS) {
    client.addEventListener(name, (event) => {
      seen.push({ name, detail: event.detail });
      wake();
    });
  }
  const of = (name) => seen.filter((event) => event.name === name).map((event) => event.detail);
  // Each waiter looks again after every event, until found() gives something or time is up.
  const until = (found, what, ms) =>
    new Promise((resolve, reject) => {
      const check = () => {
        const value = found();
        if (value === null) return;
        clearTimeout(timer);
        resolve(value);
      };
      const timer = setTimeout(() => {
        const names = seen.map((event) => event.name).join(", ");
        reject(new Error(`${what} expected within ${ms} ms; seen: ${names}`));
      }, ms);
      const previous = wake;
      wake = () => {
        previous();
        check();
      };
      check();
    });
  return {
    seen,
    of,
    /** Resolve with the details of `name` once there are `count` of them; reject after `ms`. */
    wait(name, count = 1, ms = 20000) {
      return until(() => (of(name).length >= count ? of(name) : null), `${count} "${name}" events`, ms);
    },
    /** Resolve with the first detail of `name` that `test` accepts; reject after `ms`. */
    find(name, test, ms = 20000) {
      return until(() => of(name).find(test) ?? null, `a "${name}" event like ${test}`, ms);
    },
  };
}

/** A WebSocket class (the "ws" package's) that keeps what it made, for the tests to break. */
export function trackedWebSocket() {
  const made = [];
  class Tracked extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      made.push({ socket: this, protocols });
    }
  }
  return { Tracked, made };
}

/** A Storage-like object in memory, as a page's sessionStorage kept across a reload. */
export function memoryStorage() {
  const items = new Map();
  return {
    items,
    getItem: (key) => (items.has(key) ? items.get(key) : null),
    setItem: (key, value) => void items.set(key, String(value)),
    removeItem: (key) => void items.delete(key),
  };
}
