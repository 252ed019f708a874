'use client';

import { useEffect, useSyncExternalStore } from 'react';
import { SESSION_ENDED_EVENT, getSession, type SessionInfo } from './index.ts';

/**
 * One session state per page, shared by every component that asks: however many mount, at most
 * one request is in flight. Refetched on window focus and whenever a call finds the session gone.
 */

export interface UseSessionResult {
  status: 'loading' | 'authenticated' | 'unauthenticated';
  user: (Record<string, unknown> & { sub: string }) | null;
  expiresAt: number | null;
  /** How and when the user signed in (the id_token's `acr`, `auth_time` in epoch seconds), when known. */
  acr: string | null;
  authTime: number | null;
  logoutUrl: string | null;
  /** Why this page's session ended, when it ended while the page was open (for the user to read). */
  signedOutReason: string | null;
  refresh: () => Promise<void>;
}

type Snapshot = Omit<UseSessionResult, 'refresh'>;

const LOADING: Snapshot = { status: 'loading', user: null, expiresAt: null, acr: null, authTime: null, logoutUrl: null, signedOutReason: null };
const ENDED_BY_TEXT = { elsewhere: 'You were signed out from another device.', idp: 'You signed out at the identity provider.', expired: 'Your session has ended. Sign in again.' } as const;
let snapshot: Snapshot = LOADING;
let inFlight: Promise<void> | null = null;
let loadedOnce = false;
const listeners = new Set<() => void>();

function toSnapshot(info: SessionInfo): Snapshot {
  if (info.authenticated) {
    return { status: 'authenticated', user: info.user, expiresAt: info.expiresAt, acr: info.acr ?? null, authTime: info.authTime ?? null, logoutUrl: info.logoutUrl, signedOutReason: null };
  }
  // A session that was signed in a moment ago keeps the reason a failed call already gave.
  const reason = info.endedBy ? ENDED_BY_TEXT[info.endedBy] : snapshot.status === 'authenticated' ? pendingReason : snapshot.signedOutReason;
  return { status: 'unauthenticated', user: null, expiresAt: null, acr: null, authTime: null, logoutUrl: null, signedOutReason: reason ?? null };
}

/** The reason carried by the last session-ended event, until the refetch it triggers lands. */
let pendingReason: string | null = null;

function publish(next: Snapshot): void {
  snapshot = next;
  for (const listener of listeners) listener();
}

/** Fetches the session once for every caller that asks while a fetch is running. */
export function refreshSession(): Promise<void> {
  inFlight ??= getSession()
    .then(
      (info) => publish(toSnapshot(info)),
      // A failed check (store or network blip) keeps what we knew rather than signing the user out.
      () => {
        if (snapshot.status === 'loading') publish({ ...LOADING, status: 'unauthenticated' });
      },
    )
    .finally(() => {
      inFlight = null;
    });
  return inFlight;
}

const onWindowEvent = (event: Event) => {
  if (event.type === SESSION_ENDED_EVENT) pendingReason = (event as CustomEvent<{ message?: string }>).detail?.message ?? null;
  void refreshSession();
};

function subscribe(listener: () => void): () => void {
  listeners.add(listener);
  if (listeners.size === 1) {
    window.addEventListener('focus', onWindowEvent);
    window.addEventListener(SESSION_ENDED_EVENT, onWindowEvent);
  }
  return () => {
    listeners.delete(listener);
    if (listeners.size === 0) {
      window.removeEventListener('focus', onWindowEvent);
      window.removeEventListener(SESSION_ENDED_EVENT, onWindowEvent);
    }
  };
}

export function useSession(): UseSessionResult {
  const state = useSyncExternalStore(subscribe, () => snapshot, () => LOADING);
  useEffect(() => {
    if (!loadedOnce) {
      loadedOnce = true;
      void refreshSession();
    }
  }, []);
  return { ...state, refresh: refreshSession };
}

/** For tests: forget the shared state. */
export function resetSessionStateForTests(): void {
  snapshot = LOADING;
  inFlight = null;
  loadedOnce = false;
  pendingReason = null;
}
