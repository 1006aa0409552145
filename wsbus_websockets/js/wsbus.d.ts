// Types of wsbus.js, the JavaScript client of the wsbus wire protocol v1 (JSON codec).
// They need only what browsers and Node share (Event, EventTarget, AbortSignal): they check
// with TypeScript's "DOM" library or with @types/node alone. The protocol itself:
// docs/protocol.md of wsbus.

/** Any value JSON can carry: the content of a frame. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** Who sent a client message, as the gateway stamped it (never written by a client). */
export interface ClientSender {
  type: "client";
  conn_id: string;
  alias: string | null;
  user: string | null;
}

/**
 * A frame from the gateway. `C` is the type of its content, as the application knows it:
 * the client does not check it.
 */
export interface Frame<C = unknown> {
  type: string;
  content: C;
  /** Every gateway frame has one; the id to acknowledge, with `ack`. */
  id?: string;
  /** The id of the frame this one answers. */
  reply_to?: string;
  /** The sending service's name; absent on the gateway's own frames. */
  from?: string;
  /** The history group of this message, and its place there (`pos`, e.g. "Qm9vdA_x:17"). */
  group?: string;
  pos?: string;
  /** The service wants a wsbus.processed for it (sent by the client, see ackTypes). */
  ack?: boolean;
}

/** The limits of the gateway, from its welcome. */
export interface Limits {
  max_frame_bytes: number;
  max_depth: number;
  max_items: number;
  /** Messages a second, on average. */
  rate: number;
  burst: number;
  /** Refused frames allowed per window (60 s by default) before a close with 4400. */
  error_budget: number;
}

/** The content of wsbus.welcome: the connection is ready. */
export interface Welcome {
  protocol: string;
  conn_id: string;
  codec: string;
  /** The authenticated user; null for an anonymous client. */
  user: string | null;
  limits: Limits;
  /** Present when the gateway resumes sessions: the token, and seconds it stays good. */
  resume?: { token: string; window: number };
}

/** The content of wsbus.resumed: the session came back on a new connection. */
export interface Resumed {
  conn_id: string;
  alias: string | null;
  user: string | null;
  groups: string[];
  /** Groups whose missed messages follow, complete. */
  recovered: string[];
  /** Groups to fetch again from a service: their messages could not all be replayed. */
  resync: string[];
  /** Unacknowledged messages that come again first. */
  redelivered: number;
  token: string;
  /** The alias the session had, when another connection took it meanwhile. */
  alias_lost?: string;
}

/** The content of wsbus.error: one frame was refused; the connection stays open. */
export interface ErrorContent {
  code: string;
  message: string;
  retry: boolean;
  /** The id of the refused frame, when it had a valid one. */
  ref?: string;
}

/** The content of wsbus.ack: the bus accepted the frame whose id is `ref`. */
export interface AckContent {
  ref: string;
}

/** The content of wsbus.gap: messages meant for this client may have been lost. */
export interface GapContent {
  reason: string;
  message?: string;
  /** Only these groups are concerned; absent: the whole connection. */
  groups?: string[];
}

/** The detail of a "resync" event: state lost at a reconnect, to fetch again. */
export interface ResyncDetail {
  /** The groups concerned. */
  groups: string[];
  /** True: the session was resumed, these groups were not replayed in full. False: a new session. */
  restored: boolean;
  /** "resync" (resumed with holes), "resume_failed" or "not_offered" (a new session). */
  reason: "resync" | "resume_failed" | "not_offered";
  /** The alias the session lost, when another connection took it meanwhile. */
  alias_lost?: string;
  /** What happened, for people. */
  message: string;
}

/** The detail of a "close" event. */
export interface CloseDetail {
  /** The WebSocket close code (docs/protocol.md#close-codes); 1006: lost without a close. */
  code: number;
  reason: string;
  /** True: the client will not reconnect by itself. */
  final: boolean;
}

/** The detail of a "reconnecting" event. */
export interface ReconnectingDetail {
  /** Attempts in a row so far, this one included. */
  attempt: number;
  /** Milliseconds before this attempt. */
  delay: number;
}

/** The detail of each event the client dispatches, by event name. */
export interface WsbusEventMap {
  welcome: Welcome;
  resumed: Resumed;
  resync: ResyncDetail;
  frame: Frame;
  ack: Frame<AckContent>;
  error: Frame<ErrorContent>;
  gap: Frame<GapContent>;
  close: CloseDetail;
  reconnecting: ReconnectingDetail;
}

/** An event of the client: a CustomEvent in browsers and Node 19+, an Event with `detail` in Node 18. */
export interface WsbusEvent<T> extends Event {
  readonly detail: T;
}

/** What the client needs of a WebSocket: the browser's, Node 22's, the "ws" package's. */
export interface WebSocketLike {
  readonly readyState: number;
  readonly protocol: string;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

/** A WebSocket class: `new WebSocket(url, protocols)`. */
export type WebSocketClass = new (url: string, protocols?: string | string[]) => WebSocketLike;

/** Where the resume token and positions are kept: sessionStorage, or any Storage-like object. */
export interface WsbusStorage {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

/** The options of `new WsbusClient(url, options)`. */
export interface WsbusClientOptions {
  /** A bearer token, sent as a `wsbus.token.<token>` subprotocol. */
  token?: string | null;
  /** Reconnect after 1001, 1006, 1011-1014 and 4507 (default true). */
  reconnect?: boolean;
  /** The first and the largest reconnect delay, in ms (default [100, 10000]). */
  backoff?: [number, number];
  /** Reconnect attempts in a row before giving up (default 30). */
  maxAttempts?: number;
  /** Called with each wsbus.gap frame. */
  onGap?: ((frame: Frame<GapContent>) => void) | null;
  /** Resume the session on reconnect and on a reload when the gateway offers it (default true). */
  resume?: boolean;
  /**
   * Where the resume token and positions are kept: sessionStorage by default where there is
   * one (per tab, kept across reloads), else in memory (Node). null: nowhere past the object.
   */
  storage?: WsbusStorage | null;
  /** The key in storage (default "wsbus.session " + url). */
  storageKey?: string;
  /** Called with each "resync" detail. */
  onResync?: ((detail: ResyncDetail) => void) | null;
  /** Types acknowledged only once their handlers are done ("*": every type; default []). */
  ackTypes?: Iterable<string>;
  /** Acknowledge ackTypes frames only through client.processed(frame) (default false). */
  manualAck?: boolean;
  /** Ids of acknowledged frames kept, to drop their redeliveries (default 10000). */
  remember?: number;
  /** Milliseconds to wait for the answer to wsbus.resume (default 10000). */
  openTimeout?: number;
  /**
   * The WebSocket class; globalThis.WebSocket by default (browsers, Electron, Node 22+).
   * In Node 18 and 20: `import { WebSocket } from "ws"`, then `{ WebSocket }`.
   */
  WebSocket?: WebSocketClass;
}

/** The options of `client.send`. */
export interface SendOptions {
  /** The frame's id: the gateway answers wsbus.ack (or wsbus.error) with it as `ref`. */
  id?: string;
  /** The id of the gateway frame this one answers. */
  replyTo?: string;
  /** W3C Trace Context `traceparent`: the server's spans continue this trace (docs/tracing.md). */
  traceparent?: string;
  /** W3C Trace Context `tracestate`, only with `traceparent`. */
  tracestate?: string;
}

/** The options of `client.request`. */
export interface RequestOptions {
  /** Wait for the reply (default) or only for the wsbus.ack. */
  wait?: "reply" | "ack";
  /** Milliseconds before the promise rejects with WsbusTimeout (default 10000). */
  timeout?: number;
  /** W3C Trace Context `traceparent`: the server's spans continue this trace (docs/tracing.md). */
  traceparent?: string;
  /** W3C Trace Context `tracestate`, only with `traceparent`. */
  tracestate?: string;
}

/** A handler of `client.on`; a promise it returns delays the acknowledgement of ackTypes frames. */
export type FrameHandler<C = unknown> = (frame: Frame<C>) => unknown;

/** The gateway refused a request with a wsbus.error frame. */
export class WsbusError extends Error {
  constructor(code: string, message: string, retry?: boolean);
  readonly name: "WsbusError";
  /** The error code: "no_route", "forbidden", "rate_limited", ... (docs/protocol.md). */
  code: string;
  /** True: worth sending again after a pause. */
  retry: boolean;
}

/** The connection closed (or was not open); `code` is the WebSocket close code. */
export class WsbusClosed extends Error {
  constructor(code: number, reason?: string);
  readonly name: "WsbusClosed";
  code: number;
  reason: string | undefined;
}

/** No answer to a request within its timeout. */
export class WsbusTimeout extends Error {
  constructor(type: string, timeout: number);
  readonly name: "WsbusTimeout";
  /** The type of the request. */
  type: string;
  /** Its timeout, in ms. */
  timeout: number;
}

/** A connection to a wsbus gateway that reconnects with backoff and jitter, and resumes. */
export class WsbusClient extends EventTarget {
  /**
   * Make a client; connect() opens it.
   *
   * @throws TypeError when no WebSocket class is given and the runtime has none (Node < 22).
   */
  constructor(url: string, options?: WsbusClientOptions);

  /** The gateway's URL; a reconnect goes to the URL it holds then. */
  url: string;
  token: string | null;
  reconnect: boolean;
  backoff: [number, number];
  maxAttempts: number;
  onGap: ((frame: Frame<GapContent>) => void) | null;
  onResync: ((detail: ResyncDetail) => void) | null;
  resume: boolean;
  ackTypes: Set<string>;
  manualAck: boolean;
  remember: number;
  openTimeout: number;
  /** wsbus.gap frames received. */
  gaps: number;
  /** Connections that resumed the session. */
  resumes: number;
  /** "resync" events. */
  resyncs: number;
  /** Frames dropped because the client had them already. */
  duplicates: number;
  /** The welcome of the open connection, or null. */
  welcome: Welcome | null;
  /** The last wsbus.resumed content, or null. */
  resumed: Resumed | null;

  /** The last position seen per history group ({"room.1": "e9f3:17"}; a copy). */
  readonly positions: Record<string, string>;
  /** The token the next resume presents, or null. */
  readonly resumeToken: string | null;
  /** The subprotocol the gateway chose ("wsbus.v1.json"), or null before a connection. */
  readonly protocol: string | null;
  /** The connection id the gateway gave this connection, once welcomed. */
  readonly connId: string | null;
  /** True while the connection is open, welcomed, and not waiting for its resume. */
  readonly connected: boolean;

  /** Open the connection; resolves with the welcome (once resumed, when resuming), rejects with WsbusClosed. */
  connect(): Promise<Welcome>;
  /** A fresh frame id. */
  nextId(): string;
  /** Send a message; does not wait. Throws WsbusClosed when not connected. */
  send(type: string, content?: unknown, options?: SendOptions): void;
  /** Send a frame exactly as given: for tests and demonstrations. Throws WsbusClosed when not connected. */
  sendRaw(text: string): void;
  /**
   * Send a message with an id and wait for its answer: the reply (wait "reply") or the
   * wsbus.ack (wait "ack"). Rejects with WsbusError on a wsbus.error, WsbusClosed when the
   * connection closes, WsbusTimeout on timeout.
   */
  request<R = unknown>(
    type: string,
    content?: unknown,
    options?: { wait?: "reply"; timeout?: number },
  ): Promise<Frame<R>>;
  request(
    type: string,
    content: unknown,
    options: { wait: "ack"; timeout?: number },
  ): Promise<Frame<AckContent>>;
  request(type: string, content?: unknown, options?: RequestOptions): Promise<Frame>;
  /** Call handler(frame) for every frame of a type ("*": every frame); returns an unsubscribe. */
  on<C = unknown>(type: string, handler: FrameHandler<C>): () => boolean;
  /** Stop calling handler for a type; true if it was there. */
  off<C = unknown>(type: string, handler: FrameHandler<C>): boolean;
  /** The type of the frame this client sent with id `ref` (one of the last 256), or null. */
  sentType(ref: string): string | null;
  /** Close for good: pending acknowledgements go first, the stored session is forgotten. */
  close(code?: number, reason?: string): void;
  /** Acknowledge `frame` (one with "ack": true): needed with manualAck. */
  processed(frame: Frame): void;

  addEventListener<K extends keyof WsbusEventMap>(
    type: K,
    listener: (this: WsbusClient, event: WsbusEvent<WsbusEventMap[K]>) => void,
    options?: boolean | WsbusListenerOptions,
  ): void;
  addEventListener(
    type: string,
    listener: ((event: Event) => void) | { handleEvent(event: Event): void } | null,
    options?: boolean | WsbusListenerOptions,
  ): void;
  removeEventListener<K extends keyof WsbusEventMap>(
    type: K,
    listener: (this: WsbusClient, event: WsbusEvent<WsbusEventMap[K]>) => void,
    options?: boolean | { capture?: boolean },
  ): void;
  removeEventListener(
    type: string,
    listener: ((event: Event) => void) | { handleEvent(event: Event): void } | null,
    options?: boolean | { capture?: boolean },
  ): void;
}

/** The options of addEventListener that browsers and Node share. */
export interface WsbusListenerOptions {
  capture?: boolean;
  once?: boolean;
  passive?: boolean;
  signal?: AbortSignal;
}
