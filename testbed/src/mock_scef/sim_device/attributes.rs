//! Notification attributes (LwM2M 1.1 Core §5.1.1): `pmin`, `pmax`, `gt`, `lt`, `st` set by
//! Write-Attributes on an object, instance or resource, their validation, inheritance
//! (resource over instance over object over the Server object's defaults), and the change
//! criteria that decide whether a new value is worth a notification.

/// Attributes attached at one level; `None` is "not set".
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Attributes {
    pub pmin: Option<u32>,
    pub pmax: Option<u32>,
    pub gt: Option<f64>,
    pub lt: Option<f64>,
    pub st: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(super) enum AttributeError {
    #[error("unknown attribute {0:?}")]
    Unknown(String),
    #[error("bad value for {0}")]
    BadValue(String),
    #[error("pmin is greater than pmax")]
    PminOverPmax,
    #[error("lt + 2 * st must stay below gt")]
    Thresholds,
}

/// One `name=value` (set) or bare `name` (unset) from the Uri-Query of a Write-Attributes.
#[derive(Debug, Clone, PartialEq)]
enum Change {
    Pmin(Option<u32>),
    Pmax(Option<u32>),
    Gt(Option<f64>),
    Lt(Option<f64>),
    St(Option<f64>),
}

/// A parsed Write-Attributes request.
#[derive(Debug, Clone, PartialEq, Default)]
pub(super) struct AttributeWrite {
    changes: Vec<Change>,
    /// LwM2M 1.0 drafts' `cancel` attribute (still sent by some servers): cancels the
    /// observation of the path.
    pub cancel: bool,
}

impl AttributeWrite {
    /// Parses the Uri-Query options of a Write-Attributes.
    pub(super) fn parse<'a>(
        queries: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, AttributeError> {
        let mut write = AttributeWrite::default();
        for query in queries {
            let (name, value) = match query.split_once('=') {
                Some((name, value)) => (name, Some(value)),
                None => (query, None),
            };
            let bad = || AttributeError::BadValue(name.to_string());
            let period = |v: Option<&str>| -> Result<Option<u32>, AttributeError> {
                v.map(|v| v.parse::<u32>().map_err(|_| bad())).transpose()
            };
            let number = |v: Option<&str>| -> Result<Option<f64>, AttributeError> {
                v.map(|v| {
                    v.parse::<f64>()
                        .ok()
                        .filter(|n| n.is_finite())
                        .ok_or_else(bad)
                })
                .transpose()
            };
            let change = match name {
                "pmin" => Change::Pmin(period(value)?),
                "pmax" => Change::Pmax(period(value)?),
                "gt" => Change::Gt(number(value)?),
                "lt" => Change::Lt(number(value)?),
                "st" => {
                    let step = number(value)?;
                    if step.is_some_and(|s| s < 0.0) {
                        return Err(bad());
                    }
                    Change::St(step)
                }
                "cancel" => {
                    write.cancel = true;
                    continue;
                }
                other => return Err(AttributeError::Unknown(other.to_string())),
            };
            write.changes.push(change);
        }
        Ok(write)
    }

    /// Does it set or unset a change threshold (gt, lt, st)?
    pub(super) fn touches_thresholds(&self) -> bool {
        self.changes
            .iter()
            .any(|c| matches!(c, Change::Gt(_) | Change::Lt(_) | Change::St(_)))
    }

    /// The attributes after this write; validated.
    pub(super) fn apply(&self, current: &Attributes) -> Result<Attributes, AttributeError> {
        let mut next = current.clone();
        for change in &self.changes {
            match change {
                Change::Pmin(v) => next.pmin = *v,
                Change::Pmax(v) => next.pmax = *v,
                Change::Gt(v) => next.gt = *v,
                Change::Lt(v) => next.lt = *v,
                Change::St(v) => next.st = *v,
            }
        }
        next.validate()?;
        Ok(next)
    }
}

impl Attributes {
    pub(super) fn is_empty(&self) -> bool {
        *self == Attributes::default()
    }

    fn validate(&self) -> Result<(), AttributeError> {
        if let (Some(pmin), Some(pmax)) = (self.pmin, self.pmax) {
            if pmax != 0 && pmin > pmax {
                return Err(AttributeError::PminOverPmax);
            }
        }
        if let (Some(lt), Some(gt)) = (self.lt, self.gt) {
            if lt + 2.0 * self.st.unwrap_or(0.0) >= gt {
                return Err(AttributeError::Thresholds);
            }
        }
        Ok(())
    }

    /// `self` with every attribute `more_specific` sets taking precedence.
    pub(super) fn overridden_by(&self, more_specific: &Attributes) -> Attributes {
        Attributes {
            pmin: more_specific.pmin.or(self.pmin),
            pmax: more_specific.pmax.or(self.pmax),
            gt: more_specific.gt.or(self.gt),
            lt: more_specific.lt.or(self.lt),
            st: more_specific.st.or(self.st),
        }
    }

    /// The attributes as CoRE link parameters (`;pmin=10;gt=50`), for Discover.
    pub(super) fn link_params(&self) -> String {
        let mut out = String::new();
        if let Some(v) = self.pmin {
            out.push_str(&format!(";pmin={v}"));
        }
        if let Some(v) = self.pmax {
            out.push_str(&format!(";pmax={v}"));
        }
        for (name, value) in [("gt", self.gt), ("lt", self.lt), ("st", self.st)] {
            if let Some(v) = value {
                out.push_str(&format!(";{name}={v}"));
            }
        }
        out
    }

    /// Whether a change from the last notified value to `new` meets the change criteria:
    /// crossing `gt` or `lt` in either direction, or moving by at least `st`. With none of
    /// the three set, any change counts. Non-numeric values only count when they changed.
    pub(super) fn change_worth_notifying(&self, last: Option<f64>, new: Option<f64>) -> bool {
        let (Some(last), Some(new)) = (last, new) else {
            return true;
        };
        if self.gt.is_none() && self.lt.is_none() && self.st.is_none() {
            return true;
        }
        let crossed_gt = self.gt.is_some_and(|gt| (last > gt) != (new > gt));
        let crossed_lt = self.lt.is_some_and(|lt| (last < lt) != (new < lt));
        let stepped = self.st.is_some_and(|st| (new - last).abs() >= st);
        crossed_gt || crossed_lt || stepped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(queries: &[&str]) -> Result<AttributeWrite, AttributeError> {
        AttributeWrite::parse(queries.iter().copied())
    }

    #[test]
    fn queries_set_and_unset_attributes() {
        let set = write(&["pmin=10", "pmax=60", "gt=50", "lt=-5.5", "st=2"]).unwrap();
        let attributes = set.apply(&Attributes::default()).unwrap();
        assert_eq!(
            attributes,
            Attributes {
                pmin: Some(10),
                pmax: Some(60),
                gt: Some(50.0),
                lt: Some(-5.5),
                st: Some(2.0),
            }
        );
        assert_eq!(
            attributes.link_params(),
            ";pmin=10;pmax=60;gt=50;lt=-5.5;st=2"
        );
        let unset = write(&["gt", "st"]).unwrap().apply(&attributes).unwrap();
        assert_eq!(unset.gt, None);
        assert_eq!(unset.st, None);
        assert_eq!(unset.pmin, Some(10));
        assert!(write(&["cancel"]).unwrap().cancel);
    }

    #[test]
    fn bad_attributes_are_refused() {
        assert_eq!(
            write(&["epoch=1"]),
            Err(AttributeError::Unknown("epoch".into()))
        );
        assert_eq!(
            write(&["pmin=-1"]),
            Err(AttributeError::BadValue("pmin".into()))
        );
        assert_eq!(
            write(&["gt=hot"]),
            Err(AttributeError::BadValue("gt".into()))
        );
        assert_eq!(
            write(&["st=-1"]),
            Err(AttributeError::BadValue("st".into()))
        );
        let empty = Attributes::default();
        assert_eq!(
            write(&["pmin=60", "pmax=10"]).unwrap().apply(&empty),
            Err(AttributeError::PminOverPmax)
        );
        assert_eq!(
            write(&["lt=30", "gt=10"]).unwrap().apply(&empty),
            Err(AttributeError::Thresholds)
        );
        // lt + 2*st must stay below gt.
        assert_eq!(
            write(&["lt=10", "gt=20", "st=5"]).unwrap().apply(&empty),
            Err(AttributeError::Thresholds)
        );
        assert!(
            write(&["lt=10", "gt=20", "st=4"])
                .unwrap()
                .apply(&empty)
                .is_ok()
        );
    }

    #[test]
    fn the_most_specific_level_wins() {
        let object = Attributes {
            pmin: Some(5),
            pmax: Some(100),
            ..Default::default()
        };
        let resource = Attributes {
            pmax: Some(30),
            st: Some(1.0),
            ..Default::default()
        };
        let effective = object.overridden_by(&resource);
        assert_eq!(effective.pmin, Some(5));
        assert_eq!(effective.pmax, Some(30));
        assert_eq!(effective.st, Some(1.0));
    }

    #[test]
    fn change_criteria() {
        let none = Attributes::default();
        assert!(none.change_worth_notifying(Some(1.0), Some(1.1)));
        let step = Attributes {
            st: Some(2.0),
            ..Default::default()
        };
        assert!(!step.change_worth_notifying(Some(20.0), Some(21.5)));
        assert!(step.change_worth_notifying(Some(20.0), Some(22.0)));
        assert!(step.change_worth_notifying(Some(20.0), Some(17.5)));
        let band = Attributes {
            gt: Some(30.0),
            lt: Some(0.0),
            ..Default::default()
        };
        assert!(!band.change_worth_notifying(Some(20.0), Some(29.0)));
        assert!(
            band.change_worth_notifying(Some(29.0), Some(31.0)),
            "rises above gt"
        );
        assert!(
            band.change_worth_notifying(Some(31.0), Some(29.0)),
            "falls back below gt"
        );
        assert!(
            band.change_worth_notifying(Some(1.0), Some(-1.0)),
            "falls below lt"
        );
        assert!(
            band.change_worth_notifying(None, Some(5.0)),
            "no number to compare"
        );
    }
}
